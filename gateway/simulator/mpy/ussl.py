"""MicroPython alias of ssl."""
import ssl as _m
import sys as _sys
from ssl import *  # noqa: F403

_sys.modules[__name__] = _m
