"""MicroPython alias of json."""
from json import *  # noqa: F401,F403
import json as _m
import sys as _sys
_sys.modules[__name__] = _m
