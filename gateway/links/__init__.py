"""The links, by transport name. A new transport is one module and one line here."""

from __future__ import annotations

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
