"""MicroPython alias of zlib."""
from zlib import *  # noqa: F401,F403
import zlib as _m
import sys as _sys
_sys.modules[__name__] = _m
