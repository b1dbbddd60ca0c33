"""Profile the gateway during the 16-link ingest with py-spy, and summarise it.

py-spy (``.venv/bin/pip install py-spy``; a benchmark tool, not a dependency of
the project) samples the running gateway process from outside; the samples are
saved in speedscope format (open at https://www.speedscope.app) and summarised
here as: CPU share per thread, the lines where samples land (self), and the
functions on the stack (inclusive). Idle threads (blocked in a system call or
waiting for the GIL) are not sampled, so shares are of CPU time.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import ingest
from common import Env

# Frames on every stack (thread start-up, and py-spy's per-thread root): no information.
_PLUMBING = ("thread (", "Thread.run (", "Thread._bootstrap")


def available() -> bool:
    return ingest.py_spy_path() is not None


def run(env: Env, links: int, out: Path) -> dict:
    result = ingest.run(env, links, profile=out)
    summary = summarize(out) if out.exists() else {"error": "py-spy wrote no profile"}
    return {"ingest_while_profiled": result, "profile": str(out), **summary}


def _name(frame: dict) -> str:
    """``function (short/path.py:line)``: paths from site-packages, the stdlib or gateway/."""
    file = frame.get("file") or ""
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in file:
            file = file.rsplit(marker, 1)[1]
            break
    else:
        if "/gateway/" in file:
            file = "gateway/" + file.rsplit("/gateway/", 1)[1]
    return f"{frame['name']} ({file}:{frame.get('line', '?')})" if file else frame["name"]


def _function(name: str) -> str:
    """``f (file.py:12)`` -> ``f (file.py)``: inclusive time is per function, not per line."""
    return name.rsplit(":", 1)[0] + ")" if name.endswith(")") and ":" in name else name


def summarize(path: Path, top: int = 20) -> dict:
    data = json.loads(path.read_text())
    frames = [_name(f) for f in data["shared"]["frames"]]
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0.0
    for prof in data["profiles"]:
        thread = prof["name"]
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):  # one weight per sample
            total += weight
            threads[thread] += weight
            if stack:
                self_time[frames[stack[-1]]] += weight  # speedscope stacks run root -> leaf
            for name in {_function(frames[i]) for i in stack}:  # once per sample, however deep
                if not name.startswith(_PLUMBING):
                    inclusive[name] += weight

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * w / total, 1)) for name, w in counter.most_common(top)]

    return {"samples": total, "threads_pct": share(threads), "self_pct": share(self_time),
            "inclusive_pct": share(inclusive)}


if __name__ == "__main__":  # python bench/profiling.py FILE.speedscope.json: print a saved profile's summary
    summary = summarize(Path(sys.argv[1]))
    for section in ("threads_pct", "self_pct", "inclusive_pct"):
        print(f"\n{section}")
        for name, pct in summary[section]:
            print(f"  {pct:5.1f}%  {name}")
