"""Every JSON payload the gateway publishes or reads back, defined once (docs/topics.md).

Each payload is a ``TypedDict``: its producer builds it with the function next to
it, its readers (``pico-gateway status``, discovery's diagnostic entities) take
their keys from it, and the tests check shapes against it (:func:`check`). They
are plain dicts at run time, so building one costs what a dict literal costs:
device diagnostics go out for every device every ``diagnostics_interval``, and a
command answer for every command, where a validating model would only add time
to values the gateway itself computed. Payloads read from the broker, which
anyone may have written, are decoded by the ``decode_*`` functions, which never
raise: ``None`` is "not that payload".

Types are ``typing_extensions.TypedDict`` so that pydantic (:func:`check`) can
validate them on every supported Python.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, cast

from pydantic import TypeAdapter
from typing_extensions import TypedDict

# -- <base>/<device>/diagnostics ------------------------------------------------------------------

REJECTED = ("malformed", "corrupt", "overlong", "bad_values", "unknown_type", "bad_answers", "bad_metric")
"""The link counters that ``rejected`` sums: frames refused for what they said."""


class DeviceDiagnostics(TypedDict):
    """A device's link counters, retained, e.g.::

        {"online": true, "frames": 1520, "rejected": 2, "noise": 14, "seq_gaps": 0, "reconnects": 1,
         "commands_ok": 12, "commands_failed": 1, "backlog": 0, "last_seen_ms": 1764070000000,
         "at_ms": 1764070004210, "counters": {"corrupt": 1, "frames": 1520, "hellos": 2}}

    plus the fields a link adds of its own (``Link.diagnostic_fields``: a tutorial
    UART Pico's ``"led_state": "assumed"``)."""

    online: bool
    frames: int
    rejected: int
    noise: int
    seq_gaps: int
    reconnects: int
    commands_ok: int
    commands_failed: int
    backlog: int
    last_seen_ms: int | None
    at_ms: int
    counters: dict[str, int]


DIAGNOSTIC_KEYS: tuple[str, ...] = tuple(k for k in DeviceDiagnostics.__annotations__ if k not in ("online", "at_ms",
                                                                                                  "counters"))
"""The counters of :class:`DeviceDiagnostics` worth showing one by one (``status``,
Home Assistant's diagnostic entities), in the order they are published."""


def device_diagnostics(link_stats: Counter[str], online: bool, backlog: int, last_seen_ms: int | None,
                       at_ms: int, extra: Mapping[str, object] = {}) -> DeviceDiagnostics:
    """The diagnostics of one device from its link's raw counters; ``extra``: the link's
    own fields (the common keys win over them)."""
    # A cast, not a checked literal: ``extra``'s keys are the link's own, not in the type.
    return cast(DeviceDiagnostics, {
        **extra,
        "online": online,
        "frames": link_stats["frames"],
        "rejected": sum(link_stats[k] for k in REJECTED),
        "noise": link_stats["noise"],
        "seq_gaps": link_stats["seq_gaps"],
        "reconnects": link_stats["went_offline"],
        "commands_ok": link_stats["commands_ok"],
        "commands_failed": link_stats["commands_failed"],
        "backlog": backlog,
        "last_seen_ms": last_seen_ms,
        "at_ms": at_ms,
        "counters": dict(sorted(link_stats.items())),
    })


def decode_device_diagnostics(raw: bytes | None) -> dict[str, Any] | None:
    """A retained device diagnostics message as its readers take it: the JSON object,
    whatever keys it has (an older gateway's may lack some), else None."""
    return _object(raw)


# -- <base>/bridge/<gateway_id>/diagnostics -------------------------------------------------------

class LoopReport(TypedDict):
    """One loop's last turn, as the watchdog sees it (both null before the loop has a bound)::

        {"idle_s": 0.2, "bound_s": 30.0, "stalled": false}
    """

    idle_s: float | None
    bound_s: float | None
    stalled: bool


class Health(TypedDict):
    """The gateway's health, e.g.::

        {"state": "unhealthy", "problem": "the outbox loop has not turned for 42.0 s (bound 30.0 s)",
         "at_ms": 1764070004210, "loops": {"outbox": {"idle_s": 42.0, "bound_s": 30.0, "stalled": true}}}
    """

    state: Literal["healthy", "unhealthy", "stopped"]
    problem: str
    at_ms: int
    loops: dict[str, LoopReport]


class DiskBudget(TypedDict):
    """The database's size and what the gateway writes (gateway/disk_budget.py), e.g.::

        {"db_bytes": 52428800, "file_bytes": 56623104, "free_bytes": 20401094656,
         "written_per_day": 1234567890.0, "growth_per_day": 8640000.0, "days_until_full": 54.6,
         "full_at": "max_size_mb", "window_s": 3600.0, "max_bytes": 524288000}

    ``db_bytes``: its pages in use; ``file_bytes``: its files on disk (with the WAL);
    ``free_bytes``: free on its filesystem (null: unknown); ``written_per_day``: bytes
    the gateway and its database writer write per day (null: unknown, or the window is
    too short yet); ``growth_per_day``: of ``db_bytes``; ``days_until_full``: at that
    growth, until ``full_at``: ``"max_size_mb"`` (``max_bytes``, where the oldest raw
    readings start to go) or ``"disk"`` (null: not growing); ``window_s``: the rates'
    window."""

    db_bytes: int
    file_bytes: int
    free_bytes: int | None
    written_per_day: float | None
    growth_per_day: float | None
    days_until_full: float | None
    full_at: Literal["max_size_mb", "disk"] | None
    window_s: float
    max_bytes: int | None


def disk_budget(db_bytes: int, file_bytes: int, free_bytes: int | None, written_per_day: float | None,
                growth_per_day: float | None, days_until_full: float | None, full_at: str | None, window_s: float,
                max_bytes: int | None) -> DiskBudget:
    return {"db_bytes": db_bytes, "file_bytes": file_bytes, "free_bytes": free_bytes,
            "written_per_day": written_per_day, "growth_per_day": growth_per_day,
            "days_until_full": days_until_full, "full_at": cast(Literal["max_size_mb", "disk"] | None, full_at),
            "window_s": window_s, "max_bytes": max_bytes}


def decode_disk_budget(raw: bytes | None) -> dict[str, Any] | None:
    """The ``disk`` of a retained bridge diagnostics message, when it has one, else None
    (an older gateway's has none; its keys are checked by the reader)."""
    obj = _object(raw)
    disk = obj.get("disk") if obj is not None else None
    return disk if isinstance(disk, dict) else None


class BridgeDiagnostics(TypedDict):
    """The gateway's own counters, retained, e.g.::

        {"backlog": 0, "outbox": {"sent": 1520}, "mqtt": {"published": 1534}, "bridge": {"commands_ok": 12},
         "health": {"state": "healthy", "problem": "", "at_ms": 1764070004210, "loops": {}}, "disk": null}

    ``backlog`` is None until the database was first counted; ``disk`` (DiskBudget) until
    its size was first read."""

    backlog: int | None
    outbox: dict[str, int]
    mqtt: dict[str, int]
    bridge: dict[str, int]
    health: Health
    disk: DiskBudget | None


def bridge_diagnostics(backlog: int | None, outbox: Counter[str], mqtt: Counter[str], bridge: Counter[str],
                       health: Health, disk: DiskBudget | None = None) -> BridgeDiagnostics:
    return {"backlog": backlog, "outbox": dict(sorted(outbox.items())), "mqtt": dict(sorted(mqtt.items())),
            "bridge": dict(sorted(bridge.items())), "health": health, "disk": disk}


def decode_health(raw: bytes | None) -> dict[str, Any] | None:
    """The ``health`` of a retained bridge diagnostics message, when it has one with a
    ``state`` (its other keys may be missing: shown when there), else None."""
    obj = _object(raw)
    health = obj.get("health") if obj is not None else None
    return health if isinstance(health, dict) and isinstance(health.get("state"), str) else None


# -- <base>/<device>/result/led -------------------------------------------------------------------

class CommandResult(TypedDict):
    """The one answer to a command, not retained::

        {"ok": true, "command": "toggle", "state": "on", "error": null}
        {"ok": false, "command": null, "state": null, "error": "expected on, off, toggle, ..., not 'maybe'"}
    """

    ok: bool
    command: str | None
    state: Literal["on", "off"] | None
    error: str | None


def command_result(ok: bool, command: str | None = None, state: bool | None = None,
                   error: str | None = None) -> CommandResult:
    """``command``: the word understood (None when the payload was not one); ``state``:
    the LED after it, when known."""
    return {"ok": ok, "command": command, "state": None if state is None else ("on" if state else "off"),
            "error": error}


# -- <base>/bridge/<gateway_id>/conflicts ---------------------------------------------------------

class Conflicts(TypedDict):
    """Devices this gateway owns that others claim too, retained::

        {"gateway": "gw-a", "devices": {"greenhouse": ["gw-b"]}, "forgotten": {"greenhouse": 3}}

    ``devices``: the latest few other claimants per device, sorted; ``forgotten``: how many
    older ones were dropped for them."""

    gateway: str
    devices: dict[str, list[str]]
    forgotten: dict[str, int]


def conflicts(gateway: str, devices: dict[str, list[str]], forgotten: dict[str, int]) -> Conflicts:
    return {"gateway": gateway, "devices": devices, "forgotten": forgotten}


# -- <base>/<device>/owner ------------------------------------------------------------------------

OWNER_READ = 65
"""Bytes of an owner claim read: one more than the longest gateway id, so that a
longer claim reads as no id at all."""


def owner(gateway_id: str) -> str:
    """The retained claim on a device: its owner's ``gateway_id`` as plain text (``""``,
    deleted, when the owner stopped)."""
    return gateway_id


def decode_owner(payload: bytes) -> str:
    """The claimant a retained owner message names, blanks stripped; ``""``: withdrawn.
    Not yet checked to be a gateway id (the caller counts those that are not)."""
    return payload[:OWNER_READ].decode("utf-8", "replace").strip()


# -- <base>/<device>/hello ------------------------------------------------------------------------

class Hello(TypedDict, total=False):
    """What our firmware on a Pico W says at each connect, retained::

        {"proto": 1, "fw": "1.4.0", "metrics": ["temp", "uptime", "mem_free"],
         "boot": 2215614181, "reset": "power", "ack": 240, "lost": 0}

    ``boot``: drawn at every start; ``reset``: why the board last started (``power``,
    ``watchdog``, ...); ``ack``: the readings it keeps until stored (its ``reading``
    topic, docs/protocol.md), absent from firmware that keeps none; ``lost``: readings
    its full buffer dropped since it started."""

    proto: int
    fw: str
    metrics: list[str]
    boot: int
    reset: str
    ack: int
    lost: int


HELLO_PROTO = 1  # the one version of the hello there is


def decode_hello(payload: bytes, limit: int) -> dict[str, Any] | None:
    """The hello's JSON object from the first ``limit`` bytes of ``payload``, else None
    (its keys are checked by each reader: adoption wants ``proto``, a link ``fw``)."""
    return _object(payload[:limit])


def hello_firmware(hello: Mapping[str, Any] | None) -> str | None:
    """The firmware version a hello names, when it names one."""
    fw = hello.get("fw") if hello is not None else None
    return fw if isinstance(fw, str) else None


def is_our_hello(hello: Mapping[str, Any] | None) -> bool:
    """Whether a hello is our firmware's (what adoption requires)."""
    return hello is not None and hello.get("proto") == HELLO_PROTO


# -- <base>/<device>/reading, stored, time (a Pico W that keeps its readings) ---------------------

class WifiReading(TypedDict, total=False):
    """One reading a Pico W keeps until the gateway stored it (QoS 1, not retained)::

        {"boot": 2215614181, "seq": 17, "values": {"temp": 21.5, "uptime": 85},
         "ts": 1764070000123, "age": 12, "lost": 0, "oldest": 15}

    ``ts``: Unix ms when it was taken, when the Pico knows the time; ``age``: ms from
    taking it to sending this message; ``lost``: readings its full buffer dropped
    since it started; ``oldest``: the sequence number of the oldest reading it keeps."""

    boot: int
    seq: int
    values: dict[str, float]
    ts: int
    age: int
    lost: int
    oldest: int


class WifiStored(TypedDict):
    """The gateway stored every reading of ``boot`` up to ``seq`` (not retained), and its
    clock when it said so::

        {"boot": 2215614181, "seq": 17, "now": 1764070000140}
    """

    boot: int
    seq: int
    now: int


class WifiTime(TypedDict):
    """The gateway's clock (not retained); ``resend``: send everything kept again::

        {"now": 1764070000140, "resend": true}
    """

    now: int
    resend: bool


def wifi_stored(boot: int, seq: int, now: int) -> WifiStored:
    return {"boot": boot, "seq": seq, "now": now}


def wifi_time(now: int, resend: bool) -> WifiTime:
    return {"now": now, "resend": resend}


def decode_wifi_reading(payload: bytes, limit: int) -> dict[str, Any] | None:
    """A reading's JSON object from at most ``limit`` bytes, when its ``boot``, ``seq`` and
    ``oldest`` are sequence numbers and ``values`` an object; else None. The values
    themselves are each checked by the reader (one bad value spoils only itself)."""
    if len(payload) > limit:
        return None
    obj = _object(payload)
    if obj is None or not isinstance(obj.get("values"), dict):
        return None
    for key in ("boot", "seq", "oldest"):
        n = obj.get(key)
        if type(n) is not int or not 0 <= n < 1 << 32:
            return None
    return obj


# -- pico-gateway readings --format json / csv ---------------------------------------------------

class ExportedReading(TypedDict):
    """One stored reading as ``pico-gateway readings`` exports it (a JSON array of these,
    or CSV with these columns)::

        {"ts": "2025-11-25T08:00:00.000Z", "ts_ms": 1764057600000, "metric": "temp", "value": 21.5, "seq": 17}

    ``seq``: the frame's sequence number, null when the link has none."""

    ts: str
    ts_ms: int
    metric: str
    value: float
    seq: int | None


EXPORT_COLUMNS: tuple[str, ...] = tuple(ExportedReading.__annotations__)


class ExportedRollup(TypedDict):
    """One interval of a metric as ``pico-gateway readings --every 1m|1h`` exports it (a
    JSON array of these, or CSV with these columns)::

        {"ts": "2025-11-25T08:00:00.000Z", "ts_ms": 1764057600000, "metric": "temp", "count": 60,
         "min": 21.1, "max": 21.9, "mean": 21.48, "last": 21.5}

    ``ts``: the interval's start (UTC); ``last``: the value of its latest reading."""

    ts: str
    ts_ms: int
    metric: str
    count: int
    min: float
    max: float
    mean: float
    last: float


ROLLUP_COLUMNS: tuple[str, ...] = tuple(ExportedRollup.__annotations__)


# -- encoding, decoding, checking -----------------------------------------------------------------

def encode(payload: Mapping[str, Any]) -> str:
    """A payload as it goes on the wire."""
    return json.dumps(payload)


def _object(raw: bytes | None) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw or b"")
    except ValueError:  # (UnicodeDecodeError too)
        return None
    return obj if isinstance(obj, dict) else None


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def check(model: type, obj: object, extra: bool = False) -> None:
    """Raise ValueError unless ``obj`` is a ``model`` payload, strictly: every key it
    must have, each of its type, and (unless ``extra``) no other key. For tests and
    docs: the gateway's own payloads are built right by construction."""
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = TypeAdapter(model)
    adapter.validate_python(obj, strict=True)  # (pydantic's ValidationError is a ValueError)
    if not extra and isinstance(obj, dict):
        unknown = set(obj) - set(model.__annotations__)
        if unknown:
            raise ValueError(f"{model.__name__} has no key {', '.join(sorted(unknown))}")
