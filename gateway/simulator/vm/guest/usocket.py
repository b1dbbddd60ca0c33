# MicroPython's old name of socket, which a Pico W still imports (umqtt.simple
# does): the VM finds u-names of its built-in modules itself, but socket is ours.
from socket import *  # noqa: F403 (the whole module under its old name)
