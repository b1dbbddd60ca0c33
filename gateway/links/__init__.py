"""The links, by transport name. A new transport is one module and one line here."""

from __future__ import annotations

from gateway.links.base import Link
from gateway.links.tcp import TcpLink
from gateway.links.uart import UartLink
from gateway.links.wifi import WifiLink

LINKS: dict[str, type[Link]] = {
    UartLink.transport: UartLink,
    WifiLink.transport: WifiLink,
    TcpLink.transport: TcpLink,
}
