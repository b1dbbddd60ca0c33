"""MicroPython alias of re."""
import re as _m
import sys as _sys
from re import *  # noqa: F403

_sys.modules[__name__] = _m
