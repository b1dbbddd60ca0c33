"""What a ``cmd/led`` payload may say, and nothing else.

    >>> parse_led_payload(b" ON ")
    <LedCommand.ON: 'on'>
    >>> parse_led_payload(b"rm -rf /")
    Traceback (most recent call last):
    ...
    gateway.commands.PayloadError: expected on, off, toggle, 1, 0, true or false, not 'rm -rf /'

A payload is only ever compared against this table: it never becomes code, a
path, or part of what is sent to a Pico.
"""

from __future__ import annotations

from gateway.domain import LedCommand

MAX_PAYLOAD = 64  # bytes; longer payloads are refused unread

_LED_WORDS = {
    "on": LedCommand.ON,
    "1": LedCommand.ON,
    "true": LedCommand.ON,
    "off": LedCommand.OFF,
    "0": LedCommand.OFF,
    "false": LedCommand.OFF,
    "toggle": LedCommand.TOGGLE,
}


class PayloadError(ValueError):
    pass


def parse_led_payload(payload: bytes) -> LedCommand:
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"payload too long ({len(payload)} bytes, at most {MAX_PAYLOAD})")
    # bytes.strip() and .lower() know ASCII only: str's would also strip control characters
    # (b"\x1c0" would be "0") and fold look-alike letters into one of the words.
    try:
        text = payload.strip().lower().decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not UTF-8 text") from None
    try:
        return _LED_WORDS[text]
    except KeyError:
        raise PayloadError(f"expected on, off, toggle, 1, 0, true or false, not {text[:32]!r}") from None
