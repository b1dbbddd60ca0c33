"""ruff and mypy, with the configuration in pyproject.toml, pass on the whole checkout.

Both run from the venv that runs the tests (the versions pinned in the test extra), so a
new rule or a new inference reaches the suite only when the pins move. Their caches live
in that venv, not in the checkout: on two cores mypy takes about half a second from a warm
cache and 7 CPU seconds from a cold one (a fresh venv); ruff a fraction of a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO


def _cache_dir(tool: str) -> Path:
    """A cache next to the tool's install (a new venv starts cold, as the tool may have changed)."""
    venv = Path(sys.prefix)
    base = venv if os.access(venv, os.W_OK) else Path(tempfile.gettempdir()) / "pico-gateway-lint"
    return base / f".{tool}-cache"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--no-fix", "--output-format", "concise", "--cache-dir", str(_cache_dir("ruff")),
                  ".")
    if result.returncode != 0:
        pytest.fail(f"ruff check found problems:\n{result.stdout}{result.stderr}", pytrace=False)


def test_mypy_finds_nothing() -> None:
    # The files and options are pyproject.toml's ([tool.mypy]); only the cache is placed here.
    result = _run("mypy", "--cache-dir", str(_cache_dir("mypy")))
    if result.returncode != 0:
        pytest.fail(f"mypy found problems:\n{result.stdout}{result.stderr}", pytrace=False)
