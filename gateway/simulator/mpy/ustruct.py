"""MicroPython alias of struct."""
from struct import *  # noqa: F401,F403
import struct as _m
import sys as _sys
_sys.modules[__name__] = _m
