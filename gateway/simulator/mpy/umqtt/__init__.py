"""umqtt: MicroPython's minimal MQTT client (simple and robust), for the host."""
