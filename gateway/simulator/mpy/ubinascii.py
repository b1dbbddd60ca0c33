"""MicroPython alias of binascii."""
from binascii import *  # noqa: F401,F403
import binascii as _m
import sys as _sys
_sys.modules[__name__] = _m
