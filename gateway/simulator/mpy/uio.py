"""MicroPython alias of io."""
import io as _m
import sys as _sys
from io import *  # noqa: F403

_sys.modules[__name__] = _m
