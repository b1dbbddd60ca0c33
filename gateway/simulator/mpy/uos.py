"""MicroPython alias of os."""
from os import *  # noqa: F401,F403
import os as _m
import sys as _sys
_sys.modules[__name__] = _m
