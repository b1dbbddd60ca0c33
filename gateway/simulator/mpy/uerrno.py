"""MicroPython alias of errno."""
import errno as _m
import sys as _sys
from errno import *  # noqa: F403

_sys.modules[__name__] = _m
