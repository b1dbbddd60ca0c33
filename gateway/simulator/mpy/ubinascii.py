"""MicroPython alias of binascii."""
import binascii as _m
import sys as _sys
from binascii import *  # noqa: F403

_sys.modules[__name__] = _m
