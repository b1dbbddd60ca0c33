# The main loop shared by the uart and usb links: hello after boot, a reading
# every READ_INTERVAL, and commands answered as soon as their line is in.
# With acknowledgements (ring > 0, docs/protocol.md 1.8), frames the gateway
# asked for again go out one per RESEND_MS, oldest first, between the rest.
# port: an object with read() -> bytes or None (never blocks, at most a
# small chunk) and write(data).

import clock
import frame

IDLE_SLEEP_MS = 5   # loop period when nothing arrives: commands get answers in ms
RESEND_MS = 8       # one resent frame per 8 ms at most: ~125 frames/s, about 2/3 of a 115200-baud UART
RESEND_BURST = 4    # frames per loop turn at most, when turns are slower than that (so resends catch up)


def run(port, node, interval_s, ring=0):
    if ring:
        node.enable_acks(ring)
    reader = frame.LineReader()
    for f in node.hello_frames():
        port.write(f)
    readings = clock.Every(interval_s * 1000)
    last_resend = clock.ticks_ms()
    while True:
        data = port.read()
        if data:
            for line in reader.feed(data):
                for reply in node.handle_line(line):
                    port.write(reply)
            node.counts["noise"] += reader.noise
            node.counts["overlong"] += reader.overlong
            reader.noise = reader.overlong = 0
        if readings.due():
            for f in node.reading_frames(node.sensors.read()):
                port.write(f)
        if node.ring is not None and node.ring.unsent:
            now = clock.ticks_ms()
            due = clock.ticks_diff(now, last_resend) // RESEND_MS
            if due > 0:
                last_resend = now
                for _ in range(min(due, RESEND_BURST)):
                    f = node.resend_frame()
                    if f is None:
                        break
                    port.write(f)
        if not data:
            clock.sleep_ms(IDLE_SLEEP_MS)
