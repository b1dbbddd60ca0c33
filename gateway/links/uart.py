"""A Pico on the Pi's UART (GPIO14/15, /dev/serial0): see docs/links.md."""

from __future__ import annotations

from typing import Any, Literal

from gateway.links.base import DeviceConfig
from gateway.links.serial_link import SerialDeviceConfig, SerialLink
from gateway.links.simulation import Description, SerialPortSimulation


class UartConfig(SerialDeviceConfig):
    transport: Literal["uart"]
    port: str = "/dev/serial0"


class UartSimulation(SerialPortSimulation):
    tutorial = "uart_main.py"
    demo_devices = ({"id": "greenhouse", "transport": "uart", "protocol": "picogw", "port": "sim", "heartbeat": 2.0},
                    {"id": "porch", "transport": "uart", "protocol": "tutorial", "port": "sim"})

    def prepare(self, desc: Description, broker: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"UART": {"baudrate": int(desc.get("baudrate", 115200))}}, {}


class UartLink(SerialLink):
    transport = "uart"
    Config = UartConfig
    hello_on = "own port"
    firmware = "uart"
    firmware_config = {"UART": {"id": 0, "baudrate": 115200, "tx": 0, "rx": 1}}
    simulation = UartSimulation()

    @classmethod
    def config_py(cls, device: DeviceConfig) -> dict[str, Any]:
        return {"UART": {"baudrate": int(getattr(device, "baudrate", 115200))}}
