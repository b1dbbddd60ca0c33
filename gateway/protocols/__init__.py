"""Wire protocols: the picogw codec, the sessions that speak each protocol over a byte
stream, and the registry every link asks for the protocol its device's config names."""

from __future__ import annotations

from gateway.protocols.picogw_serial import PicogwSerialSession
from gateway.protocols.registry import PROTOCOLS, ProtocolKind, ProtocolRegistry
from gateway.protocols.session import SERIAL, ByteLink, SerialSession, SessionFactory, tell_stored
from gateway.protocols.tutorial_uart import TutorialUartSession

PROTOCOLS.register(SERIAL, "picogw", PicogwSerialSession)
PROTOCOLS.register(SERIAL, "tutorial", TutorialUartSession)

__all__ = ["PROTOCOLS", "SERIAL", "ByteLink", "ProtocolKind", "ProtocolRegistry", "SerialSession", "SessionFactory",
           "tell_stored"]
