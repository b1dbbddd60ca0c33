"""MicroPython alias of heapq."""
from heapq import *  # noqa: F401,F403
import heapq as _m
import sys as _sys
_sys.modules[__name__] = _m
