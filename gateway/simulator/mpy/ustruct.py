"""MicroPython alias of struct."""
import struct as _m
import sys as _sys
from struct import *  # noqa: F403

_sys.modules[__name__] = _m
