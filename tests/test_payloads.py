"""The payloads the gateway publishes and reads back (gateway/payloads.py): what users are
shown in docs/topics.md and the docstrings is what the gateway sends, and its readers
read what its producers write."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from gateway import payloads
from gateway.diagnostics import health_report
from gateway.payloads import (
    BridgeDiagnostics,
    CommandResult,
    Conflicts,
    DeviceDiagnostics,
    DiskBudget,
    ExportedReading,
    Health,
    Hello,
    LoopReport,
    check,
)
from gateway.progress import Heartbeat
from gateway.status import health_line

ROOT = Path(__file__).resolve().parent.parent
MODELS = (DeviceDiagnostics, BridgeDiagnostics, Health, LoopReport, CommandResult, Conflicts, Hello,
          ExportedReading, DiskBudget)


def json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text``, one after another (one per line, or one over several)."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while True:
        start = text.find("{", at)
        if start < 0:
            return objects
        obj, at = decoder.raw_decode(text, start)
        objects.append(obj)


def model_of(obj: dict) -> type:
    """The one payload type whose keys ``obj`` has (an example of no known payload fails)."""
    fits = [m for m in MODELS if set(m.__required_keys__) <= set(obj) <= set(m.__annotations__)]
    assert len(fits) == 1, (obj, fits)
    return fits[0]


def test_the_documented_examples_are_the_payloads() -> None:
    """Each ```json example in docs/topics.md is a payload the gateway sends, key for key."""
    text = (ROOT / "docs" / "topics.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    examples = [obj for block in blocks for obj in json_objects(block)]
    assert len(examples) >= 4
    seen = set()
    for obj in examples:
        model = model_of(obj)
        check(model, obj)
        seen.add(model)
    assert {CommandResult, DeviceDiagnostics} <= seen


def test_the_docstring_examples_are_the_payloads() -> None:
    """Each payload type's docstring shows it on the wire: that example is one of it."""
    for model in MODELS:
        examples = json_objects(model.__doc__.split("::", 1)[1])
        assert examples, model.__name__
        for obj in examples:
            check(model, obj)


def test_check_refuses_what_is_not_the_payload() -> None:
    good = payloads.command_result(True, "on", True)
    check(CommandResult, good)
    for bad in ({**good, "state": "dim"}, {k: v for k, v in good.items() if k != "error"}, {**good, "extra": 1},
                {**good, "ok": "yes"}):
        with pytest.raises(ValueError):
            check(CommandResult, bad)


def test_what_the_producers_build_is_the_payload() -> None:
    stats = Counter({"frames": 7, "corrupt": 2, "bad_metric": 1, "went_offline": 3, "hellos": 1})
    diag = payloads.device_diagnostics(stats, True, 4, None, 1764070004210, {"led_state": "assumed", "online": 0})
    check(DeviceDiagnostics, diag, extra=True)
    assert (diag["online"], diag["rejected"], diag["reconnects"], diag["led_state"]) == (True, 3, 3, "assumed")
    assert list(diag["counters"]) == sorted(stats)
    for args in ((True, "toggle", False), (False, None, None, "expected on, off, ..."), (False, "on", None, "late")):
        check(CommandResult, json.loads(payloads.encode(payloads.command_result(*args))))
    check(Conflicts, payloads.conflicts("gw-a", {"greenhouse": ["gw-b"]}, {}))
    beat = Heartbeat("outbox", 30.0)
    beat.beat()
    check(LoopReport, beat.report())
    stopped = health_report(None, stopped=True)  # type: ignore[arg-type]  # (a stopped report asks no bridge)
    check(Health, stopped)
    summary = payloads.bridge_diagnostics(None, Counter(sent=1), Counter(), Counter(commands_ok=2), stopped)
    check(BridgeDiagnostics, json.loads(payloads.encode(summary)))


def test_status_reads_what_the_gateway_publishes() -> None:
    """``pico-gateway status``'s health line from a bridge diagnostics message as built."""
    health: Health = {"state": "unhealthy", "problem": "the outbox loop has not turned for 42.0 s (bound 30.0 s)",
                      "at_ms": 1764070004210, "loops": {}}
    raw = payloads.encode(payloads.bridge_diagnostics(0, Counter(), Counter(), Counter(), health)).encode()
    assert health_line(raw).startswith("unhealthy: the outbox loop has not turned for 42.0 s (bound 30.0 s) (as of ")
    assert health_line(b"[1]") == health_line(b"{") == health_line(None) == ""


def test_hello_and_owner_decoding() -> None:
    assert payloads.hello_firmware(payloads.decode_hello(b'{"proto": 1, "fw": "1.4.0"}', 1024)) == "1.4.0"
    assert payloads.is_our_hello(payloads.decode_hello(b'{"proto": 1}', 1024))
    for bad in (b"", b"\xff", b"[1]", b'{"proto": 2, "fw": 3}', b'{"proto": 1, "fw": "' + b"1" * 2000 + b'"}'):
        hello = payloads.decode_hello(bad, 1024)
        assert payloads.hello_firmware(hello) is None or not payloads.is_our_hello(hello), bad
    assert payloads.decode_owner(payloads.owner("gw-a").encode() + b"\n") == "gw-a"
    assert payloads.decode_owner(b"x" * 70) == "x" * payloads.OWNER_READ  # too long to be an id


def test_discovery_entities_read_diagnostics_keys() -> None:
    """Home Assistant's diagnostic entities template keys the device diagnostics have, as numbers."""
    from gateway.config import parse_config
    from gateway.discovery import DIAGNOSTICS, Discovery, DiscoveryConfig
    config = parse_config({"gateway_id": "gw", "devices": [{"id": "d", "transport": "uart", "port": "/dev/x"}]})
    discovery = Discovery(DiscoveryConfig(), "gw", "pico", config.devices, lambda *a: None, lambda *a: None)
    templates = [c["value_template"] for c in discovery.device_payload("d")["cmps"].values()
                 if c.get("state_topic") == "pico/d/diagnostics"]
    assert len(templates) == len(DIAGNOSTICS)
    for template in templates:
        for key in re.findall(r"value_json\.(\w+)", template):
            assert key in payloads.DIAGNOSTIC_KEYS, template
    assert {key for key, _, _ in DIAGNOSTICS} <= set(payloads.DIAGNOSTIC_KEYS)
