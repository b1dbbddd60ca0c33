"""MicroPython alias of errno."""
from errno import *  # noqa: F401,F403
import errno as _m
import sys as _sys
_sys.modules[__name__] = _m
