"""Wire protocols: the picogw codec and the sessions that speak each protocol."""

from __future__ import annotations

from gateway.protocols.picogw_serial import PicogwSerialSession
from gateway.protocols.tutorial_uart import TutorialUartSession

serial_sessions = {
    "picogw": PicogwSerialSession,
    "tutorial": TutorialUartSession,
}
