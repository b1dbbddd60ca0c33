# tcp link (Pico W): the tutorial's TCP command server, so a gateway drives
# it like a tutorial Pico. One connection per command, closed after it:
#   "on\n"   LED on, no answer          "off\n"  LED off, no answer
#   "?\n"    answers "on\n" or "off\n"
#   "r\n"    (our extension) answers one line of readings,
#            "temp=21.53 uptime=5 mem_free=171232\n"
# Anything else is closed without an answer. The listening socket is
# non-blocking, so the loop keeps sampling (and keeps the uptime counter
# going) between connections.

import socket

import clock
import frame
import led as ledmod
import wifi

DEFAULTS = {"host": "0.0.0.0", "port": 8080}
CLIENT_TIMEOUT_S = 2.0
MAX_REQUEST = 32
LOOP_MS = 20
WIFI_CHECK_MS = 2000


def readings_line(readings):
    parts = []
    for name, value in readings:
        text = frame.fmt_number(value)
        if text is not None:
            parts.append(name + "=" + text)
    return (" ".join(parts) + "\n").encode()


def answer(node, request):
    # The reply to one request line (bytes, maybe empty), acting on the LED.
    cmd = request.strip()
    if cmd == b"on":
        ledmod.apply(node.led, ledmod.ON)
    elif cmd == b"off":
        ledmod.apply(node.led, ledmod.OFF)
    elif cmd == b"?":
        return node.led.word().encode() + b"\n"
    elif cmd == b"r":
        return readings_line(node.sensors.read())
    return b""


def handle(conn, node):
    try:
        conn.settimeout(CLIENT_TIMEOUT_S)
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        reply = answer(node, data.split(b"\n")[0])
        if reply:
            conn.send(reply)
    except OSError as e:
        print("tcp: client:", repr(e))
    finally:
        conn.close()


def listen(cfg):
    addr = socket.getaddrinfo(cfg["host"], cfg["port"])[0][-1]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(2)
    s.setblocking(False)
    print("tcp: listening on", cfg["port"])
    return s


def run(config, node):
    c = dict(DEFAULTS)
    c.update(getattr(config, "TCP", None) or {})
    w = dict(getattr(config, "WIFI", None) or {})
    wlan = wifi.station()
    backoff = wifi.Backoff()
    readings = clock.Every(getattr(config, "READ_INTERVAL", 5.0) * 1000)
    while True:
        wifi.connect(wlan, w, backoff)
        server = None
        try:
            server = listen(c)
            backoff.reset()
            check = clock.Every(WIFI_CHECK_MS)
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:      # EAGAIN: nobody waiting
                    conn = None
                if conn is not None:
                    handle(conn, node)
                if readings.due():
                    node.sensors.read()   # keep sampling (uptime keeps counting)
                if check.due() and not wlan.isconnected():
                    raise OSError("wifi lost")
                clock.sleep_ms(LOOP_MS)
        except OSError as e:
            print("tcp:", repr(e))
        if server is not None:
            server.close()
        backoff.wait()
