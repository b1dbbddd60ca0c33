"""MicroPython alias of hashlib."""
from hashlib import *  # noqa: F401,F403
import hashlib as _m
import sys as _sys
_sys.modules[__name__] = _m
