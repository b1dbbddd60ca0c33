"""MicroPython alias of heapq."""
import heapq as _m
import sys as _sys
from heapq import *  # noqa: F403

_sys.modules[__name__] = _m
