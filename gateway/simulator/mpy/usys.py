"""MicroPython alias of sys."""
import sys as _m
import sys as _sys
from sys import *  # noqa: F403

_sys.modules[__name__] = _m
