"""MicroPython alias of socket."""
import socket as _m
import sys as _sys
from socket import *  # noqa: F403

_sys.modules[__name__] = _m
