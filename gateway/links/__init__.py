"""The links, by transport name: the one table every part of the gateway asks.

A new transport is one module with a :class:`~gateway.links.base.Link` subclass and
one line that registers it: a line in :data:`LINKS` below for a link of the gateway's
own, or ``register(MyLink)`` in a module of its own that the config names in its
``plugins`` key (docs/links.md, "Writing a link").
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import TypeVar

from gateway.links.base import Link
from gateway.links.i2c import I2cLink
from gateway.links.tcp import TcpLink
from gateway.links.uart import UartLink
from gateway.links.usb import UsbLink
from gateway.links.wifi import WifiLink

LINKS: dict[str, type[Link]] = {
    UartLink.transport: UartLink,
    WifiLink.transport: WifiLink,
    TcpLink.transport: TcpLink,
    I2cLink.transport: I2cLink,
    UsbLink.transport: UsbLink,
}

L = TypeVar("L", bound=type[Link])
TRANSPORT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def register(link: L) -> L:
    """Add ``link`` to :data:`LINKS` under its ``transport``; returns it (so it serves as a
    class decorator too). ValueError when the name is not a transport name
    (``[a-z][a-z0-9_]*``, at most 32) or is another link's already."""
    name = getattr(link, "transport", None)
    if not isinstance(name, str) or not TRANSPORT_NAME.fullmatch(name):
        raise ValueError(f"{link.__name__}.transport must be a name of lower-case letters, digits and '_', "
                         f"starting with a letter, not {name!r}")
    transport_field = link.Config.model_fields.get("transport")
    if transport_field is None or getattr(transport_field.annotation, "__args__", None) != (name,):
        raise ValueError(f"{link.__name__}.Config must declare transport: Literal[{name!r}]")
    known = LINKS.get(name)
    if known is not None and known is not link:
        raise ValueError(f"transport {name!r} is {known.__module__}.{known.__name__}'s already")
    LINKS[name] = link
    return link


class PluginError(Exception):
    """A module named in the config's ``plugins`` cannot be loaded; the message says why."""


def plugin_file(name: str, relative_to: Path) -> Path | None:
    """The file a ``plugins`` entry names (a ``.py`` path, taken from ``relative_to`` when
    relative); None for a module name."""
    if not (name.endswith(".py") or "/" in name):
        return None
    return Path(name) if Path(name).is_absolute() else relative_to / name


def load_plugin(name: str, relative_to: Path) -> None:
    """Import the module ``name`` (a module name, ``pico_gateway_ble``; or a ``.py`` file,
    taken from ``relative_to`` when relative), whose import registers its links. A module
    loaded before is not run again. PluginError saying why it cannot be loaded."""
    try:
        path = plugin_file(name, relative_to)
        if path is not None:
            _load_file(path)
        else:
            importlib.import_module(name)
    except PluginError:
        raise
    except ModuleNotFoundError as exc:
        raise PluginError(f"cannot import {name!r}: {exc} (install it, or name its .py file)") from None
    except Exception as exc:  # the plugin's own error: say it, whatever it is
        raise PluginError(f"loading {name!r} failed: {type(exc).__name__}: {exc}") from None


def _load_file(path: Path) -> None:
    path = path.resolve()
    if not path.is_file():
        raise PluginError(f"{path} is not a file")
    module_name = "pico_gateway_plugin_" + re.sub(r"\W", "_", path.stem)
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != path:
            raise PluginError(f"{path}: another plugin of that file name is loaded already ({loaded.__file__})")
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # (before it runs: its classes' annotations are resolved through it)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise


def for_firmware(name: object) -> type[Link] | None:
    """The link whose Picos run our firmware's link ``name`` (``LINK`` in config.py); None
    for a name no link runs."""
    return next((link for link in LINKS.values() if link.firmware is not None and link.firmware == name), None)


def firmware_links() -> set[str]:
    """The links of our firmware (``LINK`` in config.py) that the gateway's links need."""
    return {link.firmware for link in LINKS.values() if link.firmware is not None}
