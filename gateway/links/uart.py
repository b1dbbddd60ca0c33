"""A Pico on the Pi's UART (GPIO14/15, /dev/serial0): see docs/links.md."""

from __future__ import annotations

from typing import Any, Literal

from gateway.links.base import DeviceConfig
from gateway.links.serial_link import SerialDeviceConfig, SerialLink


class UartConfig(SerialDeviceConfig):
    transport: Literal["uart"]
    port: str = "/dev/serial0"


class UartLink(SerialLink):
    transport = "uart"
    Config = UartConfig
    hello_on = "own port"

    @classmethod
    def config_py(cls, device: DeviceConfig) -> dict[str, Any]:
        return {"UART": {"baudrate": int(getattr(device, "baudrate", 115200))}}
