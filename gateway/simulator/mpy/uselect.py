"""MicroPython alias of select."""
from select import *  # noqa: F401,F403
import select as _m
import sys as _sys
_sys.modules[__name__] = _m
