"""MicroPython alias of ssl."""
from ssl import *  # noqa: F401,F403
import ssl as _m
import sys as _sys
_sys.modules[__name__] = _m
