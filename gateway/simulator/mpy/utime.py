"""MicroPython alias of time."""
import sys as _sys
import time as _m
from time import *  # noqa: F403

_sys.modules[__name__] = _m
