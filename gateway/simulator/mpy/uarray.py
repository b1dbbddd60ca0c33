"""MicroPython alias of array."""
from array import *  # noqa: F401,F403
import array as _m
import sys as _sys
_sys.modules[__name__] = _m
