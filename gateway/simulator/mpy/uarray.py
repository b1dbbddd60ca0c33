"""MicroPython alias of array."""
import array as _m
import sys as _sys
from array import *  # noqa: F403

_sys.modules[__name__] = _m
