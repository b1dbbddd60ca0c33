"""What the gateway's parts share whatever the transport: device ids, LED commands and
their errors, the clock readings are stamped with, the strict base of every config model,
and a reading's value as it travels on MQTT.

Nothing here knows a link or a protocol, so the bridge, commands, discovery, the
recorder, config and the protocols can all use it without importing a link module.
"""

from __future__ import annotations

import math
import re
import time
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
RECORDER_GROUP_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # a shared-subscription group name
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
RESERVED_IDS = frozenset({"bridge"})
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
MAX_VALUE_BYTES = 32


def is_device_id(name: str) -> bool:
    """Whether ``name`` may be a device id (as in a topic from the broker)."""
    return bool(_DEVICE_ID.match(name)) and name not in RESERVED_IDS


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_value(payload: bytes) -> float | None:
    """A reading's value as published on MQTT (``b"21.5"``), or None if it is not one."""
    if len(payload) > MAX_VALUE_BYTES:
        return None
    try:
        value = float(payload.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class StrictModel(BaseModel):
    """Config models reject unknown keys: a typo must not be silently ignored. Numbers are
    finite: an interval of ``inf`` would end a link's thread at its first wait."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LedCommand(StrEnum):
    ON = "on"
    OFF = "off"
    TOGGLE = "toggle"


class CommandError(Exception):
    """A command that was not carried out; the message is shown to the user."""


# Ends the error of a command that reached a Pico which takes no deadline and did not answer:
# a Pico that was stuck reads the command when it wakes and carries it out then.
MAY_STILL_HAPPEN = "its firmware takes no deadline, so it may still carry the command out later"
