"""Ceilings: what the gateway's two sinks manage on their own, on this machine.

* paho: a bare paho-mqtt client (same QoS) in its own process publishes the
  topics and payloads the gateway would (``pico/dNN/sensor/seq`` = the sequence
  number), round robin, as fast as it can, to the same kind of private broker,
  counted by the same subscriber with the same in-flight window. Two ways of
  driving paho: ``loop_start`` (its network thread, woken per publish), and
  single-threaded (``threaded=False``: each ``publish`` writes at once, ``loop_read``
  between chunks), paho's cheapest way to publish; the gateway's ratio is taken
  against the faster of the two.
* sqlite: bare ``sqlite3`` ``executemany`` of the same rows into the gateway's
  schema (created by its own ``Store``), WAL and ``synchronous=FULL`` as in
  gateway/store.py, committed in batches of a given size.
"""

from __future__ import annotations

import multiprocessing as mp
import select
import shutil
import sqlite3
import threading
import time

from common import METRIC, Env, Subscriber, cpu_seconds, loss_report, others_cpu, wait_for

CHUNK = 8  # messages per topic per turn (the ingest feeder writes 32 frames per link, docs/performance.md).
# Left at 8: the publisher is not what bounds the ceiling (it takes ~0.4 of a core, the subscriber a whole
# one), and the ceilings the docs report were measured with it.


def paho(env: Env, topics: int, qos: int, ts_property: bool = True, threaded: bool = True) -> dict:
    work = env.tempdir(f"paho-{topics}")
    ctx = mp.get_context("spawn")
    received = ctx.RawValue("q", 0)
    stop = ctx.RawValue("b", 0)
    sent = ctx.RawArray("q", topics)  # per topic: how many published (= next sequence number)
    with env.broker(work) as broker:
        sub = Subscriber(broker.host, broker.port, counter=received)  # the publisher's window reads it
        publisher = ctx.Process(target=_publish_flood, name="paho-flood",
                                args=(broker.host, broker.port, topics, qos, ts_property, env.window, received, stop,
                                      sent, threaded))
        publisher.start()
        try:
            wait_for(lambda: sum(sent) > 0, 30, "the paho publisher to start",
                     lambda: _alive(publisher))
            time.sleep(env.warmup)
            t0, sent0, recv0, cpu0 = time.monotonic(), sum(sent), sub.received, cpu_seconds(publisher.pid)
            others0 = others_cpu(broker)
            time.sleep(env.duration)
            t1, sent1, recv1, cpu1 = time.monotonic(), sum(sent), sub.received, cpu_seconds(publisher.pid)
            others1 = others_cpu(broker)
            stop.value = 1
            publisher.join(30)
            try:
                wait_for(lambda: sub.received >= sum(sent), 15, "the last messages")
                drained = True
            except TimeoutError:
                drained = False
        finally:
            stop.value = 1
            if publisher.is_alive():
                publisher.terminate()
            sub.close()
    loss = loss_report({f"d{i:02d}": sent[i] for i in range(topics)}, sub, None)
    elapsed, delivered = t1 - t0, recv1 - recv0
    shutil.rmtree(work, ignore_errors=True)
    return {
        "topics": topics,
        "qos": qos,
        "ts_property": ts_property,
        "threaded": threaded,
        "offered_per_s": (sent1 - sent0) / elapsed,
        "delivered_per_s": delivered / elapsed,
        "cpu_s_per_1000": (cpu1 - cpu0) / delivered * 1000 if delivered else float("nan"),
        "cpu_cores": (cpu1 - cpu0) / elapsed,
        "broker_cores": (others1[0] - others0[0]) / elapsed,
        "subscriber_cores": (others1[1] - others0[1]) / elapsed,
        **loss,
        "zero_loss": drained and not loss["missing_on_mqtt"] and not loss["duplicates_on_mqtt"],
    }


def _topic(i: int) -> str:
    return f"pico/d{i:02d}/sensor/{METRIC}"


def _alive(process: mp.Process) -> None:
    if not process.is_alive() and process.exitcode is not None:
        raise RuntimeError(f"the paho publisher exited with {process.exitcode}")


def _publish_flood(host: str, port: int, topics: int, qos: int, ts_property: bool, window: int,
                   received, stop, sent, threaded: bool) -> None:
    """Child process: publish round robin while fewer than ``window`` are in flight.

    With ``ts_property`` each message carries the reading's time as the user
    property ``ts``, as the gateway's backlog messages do. ``threaded``: paho's
    network thread (``loop_start``); otherwise this thread does all the I/O."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(host, port)
    if threaded:
        client.loop_start()
        connected.wait(10)
    else:
        # Not client.loop(): it would create the wake-up socketpair that publish() writes to.
        deadline = time.monotonic() + 10
        while not connected.is_set() and time.monotonic() < deadline:
            select.select([client.socket()], [], [], 0.1)
            client.loop_read()
    names = [_topic(i) for i in range(topics)]
    total = 0
    info = None
    while not stop.value:
        wrote = False
        for i, topic in enumerate(names):
            if total - received.value + CHUNK > window:
                continue
            first = sent[i]
            for n in range(first, first + CHUNK):
                props = None
                if ts_property:
                    props = Properties(PacketTypes.PUBLISH)
                    props.UserProperty = ("ts", str(time.time_ns() // 1_000_000))
                info = client.publish(topic, str(n), qos=qos, properties=props)
            sent[i] = first + CHUNK
            total += CHUNK
            wrote = True
        if not threaded:  # acks (QoS 1) and keepalive; each publish has written itself
            client.loop_read()
            client.loop_misc()
        if not wrote:
            time.sleep(0.0002)
    if threaded:
        if info is not None:
            info.wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
    else:
        deadline = time.monotonic() + 10
        while info is not None and not info.is_published() and time.monotonic() < deadline:
            select.select([client.socket()], [], [], 0.01)
            client.loop_read()
            client.loop_write()
        client.disconnect()


def sqlite(env: Env, batch: int, devices: int = 16, seconds: float | None = None) -> dict:
    """Rows per second committing ``batch`` rows per transaction, for ``seconds``."""
    seconds = seconds or min(env.duration, 3.0)
    work = env.tempdir(f"sqlite-{batch}")
    db = work / "readings.db"
    env.source.create_store(db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("PRAGMA synchronous=FULL")
    columns = {name for _, name, *_ in conn.execute("PRAGMA table_info(readings)")}
    insert = ("INSERT INTO readings (device, metric, value, ts, seq, sent) VALUES (?, ?, ?, ?, ?, 0)"
              if "sent" in columns else  # the outbox's column (since store-and-forward)
              "INSERT INTO readings (device, metric, value, ts, seq) VALUES (?, ?, ?, ?, ?)")
    names = [f"d{i:02d}" for i in range(devices)]
    rows_done = 0
    t0, cpu0 = time.monotonic(), time.thread_time()
    while time.monotonic() - t0 < seconds:
        ts = time.time_ns() // 1_000_000
        rows = [(names[n % devices], METRIC, float(n // devices), ts, n // devices)
                for n in range(rows_done, rows_done + batch)]
        with conn:
            conn.executemany(insert, rows)
        rows_done += batch
    elapsed, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    conn.close()
    shutil.rmtree(work, ignore_errors=True)
    return {"batch": batch, "rows_per_s": rows_done / elapsed, "cpu_s_per_1000": cpu / rows_done * 1000,
            "commits_per_s": rows_done / batch / elapsed}
