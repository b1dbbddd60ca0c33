# Example of the config.py the gateway generates for each board (copied to
# the Pico's filesystem next to main.py). Only DEVICE and LINK are needed;
# every other key falls back to the value shown here. No real credentials
# belong in this file.

DEVICE = "greenhouse"          # device id: [a-z0-9][a-z0-9_-]{0,63}
LINK = "uart"                  # uart | usb | i2c | wifi | tcp
READ_INTERVAL = 5.0            # seconds between readings
# uart and usb: frames kept in RAM until the gateway says it stored them, and
# sent again after a gateway restart or an unplugged cable (docs/protocol.md
# 1.8). About 70 bytes each: 240 (20 minutes at 5 s) take ~17 kB of the
# Pico's ~190 kB heap. 0 turns acknowledgements off.
ACK_RING = 240

# uart: machine.UART id, speed and pins (UART0 on GP0/GP1 <-> Pi GPIO14/15)
UART = {"id": 0, "baudrate": 115200, "tx": 0, "rx": 1}

# i2c: the Pico is a target on I2C0 (GP4 SDA, GP5 SCL) at addr
I2C = {"id": 0, "addr": 0x43, "sda": 4, "scl": 5}
# i2c: snapshots kept for the Pi to read back after polls it missed
# (docs/protocol.md 2.1). 56 bytes each: 32 (160 s at 5 s) take 1.8 kB; at
# most 255; 0 keeps none.
I2C_RING = 32

# wifi and tcp (Pico W). broker/port/base/user/mqtt_password/client_id are
# used by the wifi link only; client_id defaults to "pico-<DEVICE>".
WIFI = {"ssid": "my-network", "password": "change-me", "broker": "192.168.1.2",
        "port": 1883, "base": "pico", "user": None, "mqtt_password": None,
        "client_id": None}

# wifi: readings kept in RAM until the gateway says it stored them, and sent
# again after a Wi-Fi, broker or gateway outage (docs/protocol.md, Wi-Fi).
# About 100 bytes each: 240 (20 minutes at 5 s) take ~24 kB of the heap. 0
# turns it off (live readings on the sensor/<m> topics only, as before).
WIFI_BUFFER = 240
# wifi: the watchdog restarts the board when its loop stops turning this long
# (ms, 8388 at most; 0 turns it off).
WATCHDOG_MS = 8000

# tcp: where the command server listens
TCP = {"host": "0.0.0.0", "port": 8080}

# Extra metrics. Names must be [a-z][a-z0-9_]{0,23} (on i2c only the first
# 8 characters show, and only 12 metrics in all).
ADC_PINS = {}        # metric name -> GPIO 26, 27 or 28; value in volts (3.3 V ref)
DIGITAL_PINS = {}    # metric name -> GPIO; input with pull-up; value 0/1

# Not part of the generated file: set False to let an unexpected error stop
# the program (for debugging) instead of resetting the board after 5 s.
RESET_ON_ERROR = True
