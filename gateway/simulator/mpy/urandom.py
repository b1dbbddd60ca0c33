"""MicroPython alias of random."""
from random import *  # noqa: F401,F403
import random as _m
import sys as _sys
_sys.modules[__name__] = _m
