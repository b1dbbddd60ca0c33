# The MicroPython modules the VM runtime puts in the guest (not imported by CPython).
