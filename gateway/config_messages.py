"""How a configuration error is told: the key's path, and what to write instead.

pydantic says *what* is wrong; these say it in the file's words::

    devices[1] (id 'shed').baudrat: unknown key for a uart device; did you mean 'baudrate'?
    mqtt.hots: unknown key; did you mean 'host'?
    devices[0] (id 'Shed').id: ids are lower case: ...; write "shed"

A key below the wrong ``[section]`` line, or a key of another transport's devices, is
named where it belongs; a pattern is said in words, not as its regular expression.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel

from gateway.domain import DEVICE_ID_PATTERN, RECORDER_GROUP_PATTERN
from gateway.links import LINKS


def describe(err: Any, data: dict[str, Any], root: type[BaseModel]) -> str:
    """``devices[1] (id 'shed').baudrate: <message>`` from a pydantic error of ``root``
    (the whole file's model) validating ``data``."""
    loc = list(err["loc"])
    out = ""
    model: type[BaseModel] | None = root
    transport = None
    if loc[:1] == ["devices"] and len(loc) >= 2 and isinstance(loc[1], int):
        index = loc[1]
        raw = data.get("devices")
        device = raw[index] if isinstance(raw, list) and index < len(raw) else None
        dev_id = device.get("id") if isinstance(device, dict) else None
        out = f"devices[{index}]" + (f" (id '{dev_id}')" if isinstance(dev_id, str) and dev_id else "")
        rest = loc[2:]
        transport = device.get("transport") if isinstance(device, dict) else None
        link = LINKS.get(transport) if isinstance(transport, str) else None
        model = link.Config if link else None
        loc = rest
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    kind = err["type"]
    message = err["msg"]
    if kind == "value_error" and err.get("ctx", {}).get("error") is not None:
        message = str(err["ctx"]["error"])  # without pydantic's "Value error, " in front
    elif kind == "extra_forbidden":
        message = _unknown_key(str(loc[-1]), _model_at(model, loc[:-1]), transport,
                               top_level=transport is None and len(loc) == 1, root=root)
    elif kind == "string_pattern_mismatch":
        message = _pattern_message(err.get("ctx", {}).get("pattern", ""), err.get("input"), message)
    elif kind == "union_tag_invalid":
        message = (f"unknown transport; expected one of: {', '.join(LINKS)} (a plugin's transport: name its "
                   "module in plugins, docs/links.md)")
    elif kind == "union_tag_not_found":
        message = f"missing 'transport' (one of: {', '.join(LINKS)})"
    return f"{out}: {message}" if out else message


def _model_at(model: type[BaseModel] | None, loc: list[Any]) -> type[BaseModel] | None:
    """The config model (section) found by following ``loc``'s keys down from ``model``."""
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _sections(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every section of the file by its TOML name: ``""`` (the top level), ``mqtt``, ``mqtt.tls``, ..."""
    found: dict[str, type[BaseModel]] = {}

    def walk(name: str, model: type[BaseModel]) -> None:
        found[name] = model
        for key, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(f"{name}.{key}" if name else key, annotation)

    walk("", root)
    return found


def _unknown_key(key: str, model: type[BaseModel] | None, transport: str | None, top_level: bool,
                 root: type[BaseModel]) -> str:
    """What to say of an unknown ``key`` of ``model`` (a device's when ``transport``): a near
    miss among the keys at its level ("did you mean"), or where it belongs (a key written
    below the wrong [section] line, a key of another transport's devices)."""
    known = [name for name, field in (model.model_fields.items() if model else ()) if not field.exclude]
    what = f"unknown key for a {transport} device" if transport else "unknown key"
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    if close:
        return f"{what}; did you mean {' or '.join(repr(c) for c in close)}?"
    homes = [name for name, section in _sections(root).items() if key in section.model_fields]
    others = [t for t, link in LINKS.items() if t != transport and key in link.Config.model_fields]
    if "" in homes:
        return (f"{what}; '{key}' is a top-level key: move it above the first [section] line "
                "(every key below a [section] line belongs to that section)")
    if homes:
        return f"{what}; '{key}' belongs under [{homes[0]}]"
    if others and transport:
        return f"{what}; '{key}' is a key of {', '.join(others)} devices (docs/links.md)"
    if others and top_level:
        return f"{what}; '{key}' is a device key: write it under a [[devices]] entry"
    if not known:
        return what
    return f"{what}; the keys here are: {', '.join(known)}" + (" (docs/links.md)" if transport else "")


def id_suggestion(value: str) -> str:
    """``value`` made into a valid id, as ``config.default_gateway_id`` makes the host name one."""
    name = re.sub(r"[^a-z0-9_-]", "-", value.strip().lower()).lstrip("-_")[:64]
    return name


def _pattern_message(pattern: str, value: Any, fallback: str) -> str:
    """A pattern mismatch in words, not as the regular expression."""
    if pattern == DEVICE_ID_PATTERN:
        fix = id_suggestion(value) if isinstance(value, str) else ""
        return ("ids are lower case: letters a-z, digits, '-' and '_', at most 64, starting with a letter or "
                "digit" + (f'; write "{fix}"' if fix and fix != value else ""))
    if pattern == RECORDER_GROUP_PATTERN:
        return "letters, digits, '-' and '_' only, 1 to 64 of them"
    return fallback
