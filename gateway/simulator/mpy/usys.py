"""MicroPython alias of sys."""
from sys import *  # noqa: F401,F403
import sys as _m
import sys as _sys
_sys.modules[__name__] = _m
