"""Ending a child process politely: SIGTERM, a grace period, then SIGKILL.

    proc = subprocess.Popen(["mosquitto", "-c", conf])
    stop_process(proc, grace=5)   # the exit code; -9 if it had to be killed
"""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM ``proc`` (if still running), wait up to ``grace`` seconds for it to
    exit, SIGKILL it if it has not; return its exit code (negative: the signal)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
