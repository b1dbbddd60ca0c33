"""MicroPython alias of re."""
from re import *  # noqa: F401,F403
import re as _m
import sys as _sys
_sys.modules[__name__] = _m
