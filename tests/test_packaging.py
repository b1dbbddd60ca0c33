"""The installed package carries the firmware, so `flash` and `simulate` work from the
venv that `install-service` builds, not only from a clone."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_the_wheel_carries_the_firmware(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                   check=True, timeout=240, capture_output=True)
    wheel = next(tmp_path.glob("pico_gateway-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for firmware in (REPO / "pico").rglob("*.py"):
        assert f"gateway/_pico/{firmware.relative_to(REPO / 'pico')}" in names, firmware
    assert "gateway/simulator/mpy/umqtt/simple.py" in names
