"""Host implementation of MicroPython's ``network`` module (Pico W / cyw43).

``WLAN.connect()`` joins a simulated access point at once (unless the
``wifi_fail`` knob is set); the station's address is 127.0.0.1, so a firmware
reaches the host's loopback services (the MQTT broker of a test).

``wifi_fail`` set while the station is joined is the access point gone: the
station drops (``isconnected()`` False, ``status()`` 0, link down) and so does
every connection the Pico had: what it sends on them vanishes and nothing
arrives any more (a read waits for its timeout, or for ever), as on a board whose
access point went away; the peer (the broker) is not told. Sockets made while it
is set cannot connect (EHOSTUNREACH). ``wifi_hang`` is the radio chip that stopped
answering: every socket call blocks while it is set (what a watchdog is for).
:func:`radio` is what the simulator's sockets (gateway/simulator/patches.py) ask."""

import errno
import time

from gateway.simulator import runtime

STA_IF = 0
AP_IF = 1

# cyw43 link status values, as returned by WLAN.status() on a Pico W
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_NO_IP = 2
STAT_GOT_IP = 3
STAT_CONNECT_FAIL = -1
STAT_NO_AP_FOUND = -2
STAT_WRONG_PASSWORD = -3

_hostname = "PicoW"
_country = "XX"


def hostname(name=None):
    global _hostname
    if name is None:
        return _hostname
    _hostname = name


def country(code=None):
    global _country
    if code is None:
        return _country
    _country = code


class WLAN:
    IF_STA = STA_IF
    IF_AP = AP_IF
    PM_NONE = 0x10
    PM_PERFORMANCE = 0xA11142
    PM_POWERSAVE = 0x111022

    def __init__(self, interface_id=STA_IF):
        self._if = interface_id
        self._active = False
        self._status = STAT_IDLE
        self._ssid = None
        self._config = {"pm": WLAN.PM_PERFORMANCE, "txpower": 31}
        self._ifconfig = ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def active(self, is_active=None):
        if is_active is None:
            return self._active
        self._active = bool(is_active)
        if not self._active:
            self._status = STAT_IDLE

    def connect(self, ssid=None, key=None, *, bssid=None):
        if not self._active:
            raise OSError("WLAN not active")  # cyw43 auto-activates; be strict
        self._ssid = ssid
        if runtime.knob("wifi_fail"):
            self._status = STAT_NO_AP_FOUND
            return
        self._status = STAT_GOT_IP
        runtime.log(f"Wi-Fi connected to {ssid!r}, ip 127.0.0.1")

    def disconnect(self):
        self._status = STAT_IDLE

    def isconnected(self):
        self._lost()
        return self._active and self._status == STAT_GOT_IP

    def _lost(self):
        if self._status == STAT_GOT_IP and runtime.knob("wifi_fail"):
            self._status = STAT_IDLE
            runtime.log("Wi-Fi: the access point is gone (wifi_fail): station and connections dropped")

    def status(self, param=None):
        self._lost()
        if param == "rssi":
            return -50
        if param is not None:
            raise ValueError("unknown status param")
        return self._status

    def ifconfig(self, config=None):
        if config is None:
            return self._ifconfig if self.isconnected() else ("0.0.0.0",) * 4
        self._ifconfig = tuple(config)

    def ipconfig(self, *args, **kw):
        if args and args[0] == "addr4":
            return (self.ifconfig()[0], self.ifconfig()[1])
        return None

    def config(self, *args, **kw):
        if kw:
            self._config.update(kw)
            return None
        if args:
            key = args[0]
            if key == "mac":
                return bytes.fromhex("28cdc1") + runtime.device_id.encode()[:3].ljust(3, b"\0")
            if key in ("ssid", "essid"):
                return self._ssid
            if key == "hostname":
                return _hostname
            return self._config.get(key)
        raise TypeError("config() needs an argument")

    def scan(self):
        return [(b"simulated-ap", b"\x00\x11\x22\x33\x44\x55", 6, -50, 3, 0)]


def radio(dropped):
    """Whether a connection of the Pico's is dead, given whether it was (``dropped``):
    it dies when ``wifi_fail`` is set and stays dead. Blocks while ``wifi_hang`` is set."""
    while runtime.knob("wifi_hang"):
        time.sleep(0.05)
    return dropped or bool(runtime.knob("wifi_fail"))


def nothing_arrives(timeout):
    """A read on a dead connection: EAGAIN when non-blocking, else a timeout (or for ever)."""
    if timeout == 0.0:
        raise BlockingIOError(errno.EAGAIN, "EAGAIN")
    if timeout is None:
        while True:  # (a firmware reading without a timeout is stuck: its watchdog's business)
            time.sleep(1)
    time.sleep(timeout)
    raise TimeoutError("timed out")
