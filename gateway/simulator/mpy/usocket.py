"""MicroPython alias of socket."""
from socket import *  # noqa: F401,F403
import socket as _m
import sys as _sys
_sys.modules[__name__] = _m
