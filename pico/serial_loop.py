# The main loop shared by the uart and usb links: hello after boot, a reading
# every READ_INTERVAL, and commands answered as soon as their line is in.
# port: an object with read() -> bytes or None (never blocks, at most a
# small chunk) and write(data).

import clock
import frame

IDLE_SLEEP_MS = 5   # loop period when nothing arrives: commands get answers in ms


def run(port, node, interval_s):
    reader = frame.LineReader()
    for f in node.hello_frames():
        port.write(f)
    readings = clock.Every(interval_s * 1000)
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
        if not data:
            clock.sleep_ms(IDLE_SLEEP_MS)
