"""MicroPython alias of hashlib."""
import hashlib as _m
import sys as _sys
from hashlib import *  # noqa: F403

_sys.modules[__name__] = _m
