"""MicroPython alias of time."""
from time import *  # noqa: F401,F403
import time as _m
import sys as _sys
_sys.modules[__name__] = _m
