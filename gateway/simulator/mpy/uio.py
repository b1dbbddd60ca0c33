"""MicroPython alias of io."""
from io import *  # noqa: F401,F403
import io as _m
import sys as _sys
_sys.modules[__name__] = _m
