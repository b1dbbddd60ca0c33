"""Where our MicroPython firmware is, for `flash` and `simulate`.

In a clone (and the editable install ``./dev`` makes) it is the repository's
``pico/``; in an installed venv (``install-service``) it is the copy packaged as
``gateway._pico`` (pyproject.toml maps ``pico/`` there).

    >>> (firmware_dir() / "main.py").is_file()
    True
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def firmware_dir() -> Path:
    clone = Path(__file__).resolve().parent.parent / "pico"
    if (clone / "main.py").is_file():
        return clone
    spec = importlib.util.find_spec("gateway._pico")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the firmware (pico/) is missing from this installation of pico-gateway")
    return Path(list(spec.submodule_search_locations)[0])
