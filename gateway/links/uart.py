"""A Pico on the Pi's UART (GPIO14/15, /dev/serial0): see docs/links.md."""

from __future__ import annotations

from typing import Literal

from gateway.links.serial_link import SerialDeviceConfig, SerialLink


class UartConfig(SerialDeviceConfig):
    transport: Literal["uart"]
    port: str = "/dev/serial0"


class UartLink(SerialLink):
    transport = "uart"
    Config = UartConfig
