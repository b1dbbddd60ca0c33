"""The links, by transport name. A new transport is one module and one line here."""

from __future__ import annotations

from gateway.links.base import Link
from gateway.links.uart import UartLink

LINKS: dict[str, type[Link]] = {
    UartLink.transport: UartLink,
}
