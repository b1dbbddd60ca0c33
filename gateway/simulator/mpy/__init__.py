"""MicroPython-compatible shim modules for the virtual Pico.

This directory is put first on ``sys.path`` of a virtual Pico process, so
``import machine`` / ``network`` / ``umqtt.simple`` / ``micropython`` find these
modules.  (It is also a package only so that it gets installed with the wheel.)
"""
