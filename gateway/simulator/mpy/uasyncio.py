"""MicroPython alias of asyncio."""
from asyncio import *  # noqa: F401,F403
import asyncio as _m
import sys as _sys
_sys.modules[__name__] = _m
