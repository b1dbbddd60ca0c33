"""MicroPython alias of json."""
import json as _m
import sys as _sys
from json import *  # noqa: F403

_sys.modules[__name__] = _m
