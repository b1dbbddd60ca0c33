"""MicroPython alias of random."""
import random as _m
import sys as _sys
from random import *  # noqa: F403

_sys.modules[__name__] = _m
