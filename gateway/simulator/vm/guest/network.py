# network for a virtual Pico W on the MicroPython VM: WLAN is a handle to the
# host's simulated station (gateway/simulator/mpy/network.py: it joins a
# simulated access point, the station's address is loopback).
from _picosim import HostObject, call, raw

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_NO_IP = 2
STAT_GOT_IP = 3
STAT_CONNECT_FAIL = -1
STAT_NO_AP_FOUND = -2
STAT_WRONG_PASSWORD = -3


def hostname(name=None):
    return call("network", ("hostname",) if name is None else ("hostname", name))


def country(code=None):
    return call("network", ("country",) if code is None else ("country", code))


class WLAN(HostObject):
    IF_STA = STA_IF
    IF_AP = AP_IF
    PM_NONE = 0x10
    PM_PERFORMANCE = 0xA11142
    PM_POWERSAVE = 0x111022

    def __init__(self, interface_id=STA_IF):
        self._new("WLAN", (interface_id,))
        self._hs = str(self._h)

    def active(self, is_active=None):
        return self._m("active") if is_active is None else self._m("active", (is_active,))

    def connect(self, ssid=None, key=None, bssid=None):
        self._m("connect", (ssid, key))

    def disconnect(self):
        self._m("disconnect")

    def isconnected(self):
        # A raw call: a firmware asks it in every turn of its loop.
        return raw("raw_wlan_up", self._hs) == "1"

    def status(self, param=None):
        return self._m("status") if param is None else self._m("status", (param,))

    def ifconfig(self, config=None):
        if config is None:
            return tuple(self._m("ifconfig"))
        self._m("ifconfig", (list(config),))

    def ipconfig(self, *args, **kw):
        return self._m("ipconfig", args, kw)

    def config(self, *args, **kw):
        return self._m("config", args, kw)

    def scan(self):
        return [tuple(x) for x in self._m("scan")]
