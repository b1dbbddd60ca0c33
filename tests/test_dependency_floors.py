"""constraints/floors.txt is what pyproject.toml allows at the lowest: CI runs the link, MQTT
and flash tests on it (.ci/run), so it must name every runtime dependency, each at its floor."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO


def test_the_floors_are_every_runtime_dependency_at_its_lowest_allowed_version() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lowest = {}
    for requirement in dependencies:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*(,\s*<\s*[^,;\s]+)?", requirement)
        assert found, f"{requirement!r}: give each dependency a floor (>=), so that CI can test it"
        lowest[found[1].lower()] = found[2]
    floors = {}
    for line in (REPO / "constraints" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            floors[name.strip().lower()] = version.strip()
    assert {name: _release(v) for name, v in floors.items()} == {name: _release(v) for name, v in lowest.items()}


def _release(version: str) -> tuple[int, ...]:
    """As pip compares them: 2.0 is 2.0.0."""
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)
