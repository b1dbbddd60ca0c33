"""MicroPython alias of zlib."""
import sys as _sys
import zlib as _m
from zlib import *  # noqa: F403

_sys.modules[__name__] = _m
