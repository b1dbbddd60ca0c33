# A usb Pico program: lines on stdin (polled) are answered on stdout.
import select
import sys

poller = select.poll()
poller.register(sys.stdin, select.POLLIN)
buf = b""
print("usb_echo ready")
while True:
    if poller.poll(50):
        c = sys.stdin.buffer.read(1)
        buf += c
        if c == b"\n":
            sys.stdout.write("echo:" + buf.decode().strip() + "\n")
            buf = b""
