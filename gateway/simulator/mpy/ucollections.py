"""MicroPython alias of collections."""
import collections as _m
import sys as _sys
from collections import *  # noqa: F403

_sys.modules[__name__] = _m
