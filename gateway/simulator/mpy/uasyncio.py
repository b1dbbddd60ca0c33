"""MicroPython alias of asyncio."""
import asyncio as _m
import sys as _sys
from asyncio import *  # noqa: F403

_sys.modules[__name__] = _m
