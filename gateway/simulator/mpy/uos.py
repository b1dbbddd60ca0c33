"""MicroPython alias of os."""
import os as _m
import sys as _sys
from os import *  # noqa: F403

_sys.modules[__name__] = _m
