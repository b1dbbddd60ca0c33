"""The ``>>>`` examples in the gateway's docstrings are true: each one runs, here.

Every module under gateway/ whose source holds an example is found by reading its
text, so a module added, moved or renamed is covered without a list to keep up; an
example that cannot run on its own (it needs a broker, a port or a config file)
is written as a plain indented block, without ``>>>``.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
EXAMPLE = re.compile(r"^\s*>>> ", re.MULTILINE)


def modules_with_examples() -> list[str]:
    names = []
    for path in sorted(GATEWAY.rglob("*.py")):
        if EXAMPLE.search(path.read_text(encoding="utf-8")):
            parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = modules_with_examples()


def test_the_gateway_has_examples_to_run() -> None:
    # Guards the discovery above: a pattern that matched nothing would pass every module.
    assert "gateway.topics" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0, f"{name}: a '>>> ' line outside any docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (see above)"
