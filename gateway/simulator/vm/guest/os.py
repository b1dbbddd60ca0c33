# The board's os: the VM's own (found with an empty sys.path, as MicroPython
# lets a file extend a built-in module) plus os.urandom, which this VM build
# lacks and a Pico has (its ring oscillator): the host's entropy, by a host
# call, so each boot gets other bytes (a firmware's BOOT_ID, say).
import sys

import _picosim

_path = sys.path[:]
sys.path[:] = []   # in place: a usb Pico's sys is a wrapper sharing this list
try:
    from os import *  # noqa: F403
finally:
    sys.path[:] = _path
del _path


def urandom(n):
    if n < 0:
        raise ValueError("negative length")
    return _picosim.call("urandom", (n,))
