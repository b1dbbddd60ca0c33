"""MicroPython alias of select."""
import select as _m
import sys as _sys
from select import *  # noqa: F403

_sys.modules[__name__] = _m
