"""The registry of links is the one place that knows the transports: the config's static
union, the firmware's table of links and config.py's sections are held equal to it, and
no module of the gateway outside gateway/links/ names a transport."""

from __future__ import annotations

import ast
import re
import typing

import pytest
from conftest import REPO
from pydantic import Field

from gateway.config import BuiltinDevice, ConfigError, parse_config
from gateway.links import LINKS, firmware_links, register
from gateway.links.base import DeviceConfig
from gateway.links.uart import UartConfig, UartLink
from gateway.simulator.config_py import defaults, render_config_py

BUILTIN = {name: link for name, link in LINKS.items() if link.__module__.startswith("gateway.links.")}


def test_the_static_union_of_device_configs_is_the_registrys_builtin_links() -> None:
    assert set(typing.get_args(BuiltinDevice)) == {link.Config for link in BUILTIN.values()}


def test_every_device_is_validated_by_its_own_links_config() -> None:
    config = parse_config({"devices": [{"id": link.transport, "transport": link.transport,
                                        **({"port": "/dev/null"} if "port" in link.Config.model_fields
                                           and link.Config.model_fields["port"].is_required() else {}),
                                        **({"host": "127.0.0.1"} if "host" in link.Config.model_fields else {})}
                                       for link in BUILTIN.values()]})
    assert [type(d) for d in config.devices] == [link.Config for link in BUILTIN.values()]


def _firmware_table() -> dict[str, str]:
    tree = ast.parse((REPO / "pico" / "main.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["LINKS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("pico/main.py has no LINKS table")


def test_the_firmwares_links_are_the_ones_the_gateways_links_run() -> None:
    """pico/main.py's table (config.LINK -> module) has a link for every firmware link a
    transport of the gateway runs (``Link.firmware``), and none that no transport runs; each
    module is in pico/ and has the ``run(config, node)`` main.py calls."""
    table = _firmware_table()
    assert set(table) == {link.firmware for link in BUILTIN.values() if link.firmware is not None}
    for module in table.values():
        source = (REPO / "pico" / f"{module}.py").read_text()
        assert re.search(r"^def run\(config, node\)", source, re.M), module


def test_config_py_has_the_sections_the_firmware_documents() -> None:
    """Each link's firmware_config (what config.py's sections hold by default) has the keys
    of the firmware's own example, pico/config_example.py."""
    example: dict[str, typing.Any] = {}
    exec((REPO / "pico" / "config_example.py").read_text(), example)
    sections = {k: v for k, v in defaults().items() if isinstance(v, dict) and k not in ("ADC_PINS", "DIGITAL_PINS")}
    assert sections, "no link declares a config.py section"
    for name, values in sections.items():
        assert isinstance(example.get(name), dict), name
        assert set(values) == set(example[name]), name
    with pytest.raises(ValueError, match="LINK must be one of"):
        render_config_py({"DEVICE": "x", "LINK": "ble"})
    assert firmware_links() >= set(_firmware_table())


def test_register_refuses_what_would_break_the_table() -> None:
    class Named(DeviceConfig):
        transport: typing.Literal["Bad-Name"]

    class BadName(UartLink):
        transport = "Bad-Name"
        Config = Named  # type: ignore[assignment]  # (a config of the wrong transport: what is refused)

    with pytest.raises(ValueError, match="lower-case"):
        register(BadName)

    class Unliteral(DeviceConfig):
        port: str = Field("x")

    class NoLiteral(UartLink):
        transport = "noliteral"
        Config = Unliteral  # type: ignore[assignment]  # (as above)

    with pytest.raises(ValueError, match="Literal"):
        register(NoLiteral)

    class Taken(UartLink):
        Config = UartConfig

    with pytest.raises(ValueError, match="already"):
        register(Taken)
    assert LINKS["uart"] is UartLink and "noliteral" not in LINKS


def test_an_unknown_transport_is_named_with_the_known_ones_and_the_plugin_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"devices": [{"id": "x", "transport": "ble"}]})
    assert err.value.problems == [
        f"devices[0] (id 'x'): unknown transport; expected one of: {', '.join(LINKS)} "
        "(a plugin's transport: name its module in plugins, docs/links.md)"]


# Where a gateway module may name a transport, and why.
NAMED_ON_PURPOSE = {
    ("gateway/adoption.py", "wifi"): "adopting Pico Ws by their hello is a feature of the wifi link",
    ("gateway/service.py", "i2c"): "the Linux group that may open /dev/i2c-*",
    ("gateway/simulator/cli.py", "uart"): "simulate --transport's default, shown in --help",
}
# The virtual Pico's own hardware (its UART, USB console, sockets): the board, not the gateway.
BOARD_SIDE = ("gateway/links/", "gateway/simulator/runtime.py",
              "gateway/simulator/patches.py", "gateway/simulator/console.py", "gateway/simulator/mpy/",
              "gateway/simulator/vm/")


def test_no_module_outside_the_links_names_a_transport() -> None:
    names = set(BUILTIN)
    found = []
    for path in sorted((REPO / "gateway").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(BOARD_SIDE):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
                    and (rel, node.value) not in NAMED_ON_PURPOSE):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "ask the registry (gateway/links/) instead:\n" + "\n".join(found)



def test_a_virtual_picos_board_and_console_follow_its_links_registry_entry() -> None:
    """A virtual Pico started on its own (no --board) takes the board its config.py's LINK
    implies and a USB console when our firmware speaks on one, as the registry says."""
    from argparse import Namespace

    from gateway.simulator.pico import _board
    for link in BUILTIN.values():
        if link.firmware is not None:
            console = link.simulation is not None and link.simulation.console
            assert _board(Namespace(board=None, usb=False), link.firmware) == (link.board, console), link
    assert _board(Namespace(board=None, usb=False), None) == ("Raspberry Pi Pico", False)
    assert _board(Namespace(board="Pico 2", usb=True), "uart") == ("Pico 2", True)
