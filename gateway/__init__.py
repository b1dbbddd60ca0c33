"""pico-gateway: bridge Raspberry Pi Picos onto MQTT and SQLite."""

__version__ = "0.1.0"
