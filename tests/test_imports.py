"""The gateway's modules import each other without cycles, and protocols never reach
back into links: a protocol runs over any byte stream, so it may not depend on one.

Every import counts, wherever it is (module level, under TYPE_CHECKING, inside a
function): a cycle hidden in a function is still two modules that cannot be
understood, tested or replaced one without the other.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # parsed once for the three tests
def import_graph() -> dict[str, set[str]]:
    """Each gateway module, and the gateway modules it imports (not to be changed: cached)."""
    paths = {module_name(path): path for path in GATEWAY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import mod`` imports the module mod; ``from mod import name``, mod
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                               for alias in node.names)
        graph[name] = {target for target in targets if target in paths and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_inside_the_gateway() -> None:
    graph = import_graph()
    assert "gateway.links.base" in graph and "gateway.protocols.session" in graph  # the walk found the package
    assert cycles(graph) == []


def test_protocols_do_not_import_links() -> None:
    graph = import_graph()
    back = sorted((module, target) for module, targets in graph.items() if module.startswith("gateway.protocols")
                  for target in targets if target.startswith("gateway.links"))
    assert back == []


def test_domain_types_come_from_no_link_module() -> None:
    """The parts around the bridge get device ids, commands and errors from gateway.domain."""
    graph = import_graph()
    for module in ("gateway.commands", "gateway.recorder", "gateway.domain", "gateway.protocols.session",
                   "gateway.protocols.picogw_serial", "gateway.protocols.tutorial_uart"):
        assert not {target for target in graph[module] if target.startswith("gateway.links")}, module
