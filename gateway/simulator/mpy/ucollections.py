"""MicroPython alias of collections."""
from collections import *  # noqa: F401,F403
import collections as _m
import sys as _sys
_sys.modules[__name__] = _m
