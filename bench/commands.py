"""Command round trip: ``cmd/led`` published -> the gateway -> the Pico's ``A`` ack ->
``state/led`` and ``result/led`` back at the publisher.

The publisher is a paho client in its own process (so the bench's subscriber
does not hold its GIL); it publishes ``on``/``off`` alternately at QoS 0,
one at a time, and times until ``result/led`` arrives (``state/led`` comes just
before it, and is timed too). With ``busy``, every link sends readings meanwhile,
the commanded one included: flooded as in the ingest measurement, or at the rate a
115,200-baud UART carries.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import socket
import threading
import time

from common import Env, GatewayProcess, Subscriber, percentile, wait_online, write_config
from picos import Picos

GATEWAY_ID = "bench"
TIMEOUT = 5.0  # seconds before a command counts as failed


WIRE_RATE = 380.0  # reading frames per second one Pico can send at 115,200 baud (~30 bytes, 10 bits a byte)


def run(env: Env, links: int, busy: bool, count: int, rate: float | None = None) -> dict:
    """``busy``: every link sends readings meanwhile, as fast as the gateway takes them,
    or at ``rate`` frames per second each (``WIRE_RATE``: as fast as a UART can carry)."""
    work = env.tempdir(f"commands-{links}")
    picos = Picos(links)
    target = picos.devices[0]
    with env.broker(work) as broker:
        sub = Subscriber(broker.host, broker.port, counter=picos.received)
        config = write_config(work / "gateway.toml", GATEWAY_ID, (broker.host, broker.port),
                              work / "readings.db", picos.peers, env.qos)
        gw = GatewayProcess(env.source, config)
        try:
            wait_online(sub, GATEWAY_ID, picos.devices, gw.started, 60, gw.check)
            if busy:
                picos.feed(env.window, rate=rate)
                time.sleep(env.warmup)
            recv0, t0 = sub.received, time.monotonic()
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            client = ctx.Process(target=command_client, name="commands",
                                 args=(broker.host, broker.port, target, count, child))
            client.start()
            timings = parent.recv() if parent.poll(count * TIMEOUT + 60) else None
            client.join(10)
            readings_per_s = (sub.received - recv0) / (time.monotonic() - t0)
            gw.check()
            acks_at_peer = picos.counts()[target].commands
        finally:
            picos.close()
            gw.stop()
            sub.close()
    shutil.rmtree(work, ignore_errors=True)
    if timings is None:
        raise RuntimeError("the command client gave no answer")
    result_ms = [r for r, _ in timings["ok"]]
    state_ms = [s for _, s in timings["ok"] if s is not None]
    return {
        "links": links, "busy": busy, "rate_per_link": rate, "commands": count, "failed": timings["failed"],
        "p50_ms": percentile(result_ms, 50), "p90_ms": percentile(result_ms, 90),
        "p99_ms": percentile(result_ms, 99), "max_ms": max(result_ms, default=float("nan")),
        "state_p50_ms": percentile(state_ms, 50), "state_p99_ms": percentile(state_ms, 99),
        "acks_at_peer": acks_at_peer, "readings_per_s_meanwhile": readings_per_s,
    }


def command_client(host: str, port: int, device: str, count: int, conn, stop=None) -> None:
    """Child process: ``count`` commands, one at a time (fewer if the multiprocessing Event
    ``stop`` is set first); sends back the timings in ms."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    base = f"pico/{device}"
    got: dict[str, float] = {}
    want = [b""]  # the command in flight: its answer names it
    arrived = threading.Event()
    subscribed = threading.Event()

    def on_message(client, userdata, msg) -> None:
        if msg.retain:
            return  # the retained state from before
        if msg.topic.endswith("/result/led"):
            if b'"command": "%s"' % (b"off" if want[0] == b"on" else b"on") in msg.payload:
                return  # a late answer to the command before (one that timed out)
            got["result"] = time.perf_counter()
            got["ok"] = float(b'"ok": true' in msg.payload)
            arrived.set()
        elif msg.payload == want[0]:
            got["state"] = time.perf_counter()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe([(f"{base}/state/led", 1), (f"{base}/result/led", 1)])
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect(host, port)
    # Without this, Nagle holds each command behind our last PUBACK until the broker's
    # delayed ACK (40 ms): a cost of this client, not of the gateway.
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    subscribed.wait(10)
    time.sleep(0.2)  # let retained messages pass
    ok: list[tuple[float, float | None]] = []
    failed = 0
    for i in range(count):
        if stop is not None and stop.is_set():
            break
        got.clear()
        arrived.clear()
        want[0] = b"on" if i % 2 == 0 else b"off"
        start = time.perf_counter()
        client.publish(f"{base}/cmd/led", want[0], qos=0)
        if arrived.wait(TIMEOUT) and got.get("ok"):
            state = got.get("state")
            ok.append(((got["result"] - start) * 1000, None if state is None else (state - start) * 1000))
        else:
            failed += 1
    client.disconnect()
    client.loop_stop()
    conn.send({"ok": ok, "failed": failed})
