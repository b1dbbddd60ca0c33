"""``./dev bench``: the gateway's performance, measured end to end (docs/performance.md).

Runs the real gateway process against a private mosquitto and virtual Picos on
pseudo-terminals, and prints one table (also saved as JSON in bench/results/):
ingest with 1/4/16 links and its ceilings (bare paho, bare sqlite3), command
round trips idle and under load, start-up time and memory, growth with devices
and database size, memory, threads and commands under floods, bytes written per
stored reading (wear) and the CPU acknowledged readings cost, then a py-spy
profile of the 16-link ingest. Every figure is the median of
``--repeat`` runs (other work on the machine moves single runs; growth and
floods: one run each unless asked).

    ./dev bench                   # the full run, ~35 minutes (wear: 15 of them)
    ./dev bench --quick           # a smoke run: 3 s measurements, one run each
    ./dev bench --rev HEAD~3      # measure another revision (a snapshot of its gateway/)
    ./dev bench --only ingest,ceilings --links 16
    ./dev bench --only floods --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import acks
import ceilings
import commands
import floods
import growth
import ingest
import profiling
import soak
import startup
import wear
from common import REPO, Env, GatewaySource, median

SECTIONS = ("ingest", "ceilings", "commands", "startup", "growth", "floods", "wear", "acks", "profile", "soak")
DEFAULT_SECTIONS = SECTIONS[:-1]  # the soak (an hour for its full year) runs when asked: --only soak
RESULTS = REPO / "bench" / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./dev bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s measurements, 1 run, 200 commands")
    p.add_argument("--duration", type=float, help="seconds each throughput is measured over (default 10)")
    p.add_argument("--repeat", type=int, help="runs per figure, the median is reported (default 3)")
    p.add_argument("--growth-repeat", type=int, help="runs per growth figure (default 1: 8 cells)")
    p.add_argument("--flood-repeat", type=int, default=1, help="runs per flood (default 1)")
    p.add_argument("--floods", default=",".join(floods.NAMES),
                   help=f"comma-separated subset of {','.join(floods.NAMES)} (default: all)")
    p.add_argument("--commands", type=int, help="commands per round-trip measurement (default 1000)")
    p.add_argument("--links", default="1,4,16", help="link counts for ingest (default 1,4,16)")
    p.add_argument("--growth-devices", default="1,4,16,64")
    p.add_argument("--growth-rows", type=int, help="pre-existing rows for growth (default 10,000,000)")
    p.add_argument("--qos", default="0,1",
                   help="mqtt.readings_qos values for ingest and the paho ceiling; the first is used for the "
                        "other sections; 'default' leaves the key out (revisions before store-and-forward)")
    p.add_argument("--window", type=int, default=1000, help="frames in flight at most (written, not yet received)")
    p.add_argument("--rev", help="git revision whose gateway/ is measured (default: the working tree)")
    p.add_argument("--broker-conf", default="set_tcp_nodelay true",
                   help="extra mosquitto.conf lines, ';'-separated (default: Nagle off, see docs/performance.md)")
    p.add_argument("--wear-devices", default="1,16,64", help="device counts for wear (default 1,16,64)")
    p.add_argument("--wear-settings", default=",".join(wear.SETTINGS), help="store settings for wear")
    p.add_argument("--wear-duration", type=float, help="seconds each wear figure is measured over (default 60)")
    p.add_argument("--wear-dir", default="/var/tmp", help="where wear's databases go: a disk, not tmpfs")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but soak)")
    p.add_argument("--soak-devices", type=int, help="soak: devices at 1 reading/s (default 16; --quick: 2)")
    p.add_argument("--soak-months", type=int, help="soak: months generated (default 12; --quick: 2)")
    p.add_argument("--soak-live-links", type=int, default=4,
                   help="soak: flooding links of the gateway during the last month's pass (0: no load phase)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    args = p.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.repeat = args.repeat or (1 if quick else 3)
    args.growth_repeat = args.growth_repeat or 1
    args.commands = args.commands or (200 if quick else 1000)
    args.growth_rows = args.growth_rows if args.growth_rows is not None else (1_000_000 if quick else 10_000_000)
    args.links = [int(n) for n in args.links.split(",")]
    args.wear_devices = [int(n) for n in args.wear_devices.split(",")]
    args.wear_settings = args.wear_settings.split(",")
    args.wear_duration = args.wear_duration or (20.0 if quick else 60.0)
    args.growth_devices = [int(n) for n in args.growth_devices.split(",")]
    args.qos = [None if q == "default" else int(q) for q in args.qos.split(",")]
    args.only = set(args.only.split(","))
    args.soak_devices = args.soak_devices or (2 if quick else 16)
    args.soak_months = args.soak_months or (2 if quick else 12)
    args.floods = args.floods.split(",")
    if set(args.floods) - set(floods.NAMES):
        p.error(f"unknown flood(s): {', '.join(sorted(set(args.floods) - set(floods.NAMES)))}")
    if args.no_profile:
        args.only.discard("profile")
    unknown = args.only - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def repeated(times: int, label: str, fn: Callable[[], dict], show: str) -> dict:
    """Run ``fn`` ``times`` times; all runs, and the median of every numeric field."""
    runs = []
    for i in range(times):
        result = fn()
        runs.append(result)
        progress(f"{label} [{i + 1}/{times}]: {show.format(**result)}")
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {k: median(r[k] for r in runs) for k in keys}
    summary.update({k: all(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, bool)})
    return {"median": summary, "runs": runs}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    import paho.mqtt

    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "paho": paho.mqtt.__version__,
            "mosquitto": mosquitto[0] if mosquitto else "?", "loadavg_start": os.getloadavg()}


# -- the table -------------------------------------------------------------------------------
class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, what: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((what, value, target, "" if ok is None else ("PASS" if ok else "MISS")))

    def section(self, title: str) -> None:
        self.rows.append((f"-- {title}", "", "", ""))

    def render(self) -> str:
        widths = [max(len(r[i]) for r in self.rows + [("measurement", "value", "target", "")]) for i in range(4)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
        out = [line(("measurement", "value", "target", "")), line(tuple("-" * w for w in widths))]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def n(value: float, digits: int = 0) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def qos_name(qos: int | None) -> str:
    return "QoS default" if qos is None else f"QoS {qos}"


# -- the run ----------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pico-bench-"))
    source = GatewaySource(args.rev, workdir)
    env = Env(source=source, workdir=workdir, duration=args.duration, warmup=0.5 if args.quick else 1.0,
              window=args.window, qos=args.qos[0],
              broker_conf="\n".join(args.broker_conf.split(";")) + "\n" if args.broker_conf else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict = {"started": stamp, "commit": source.commit, "machine": machine(),
                 "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
                 "results": {}}
    res = out["results"]
    table = Table()
    reps = args.repeat
    progress(f"gateway {source.commit[:12]} from {source.root}; work in {workdir}; "
             f"{args.duration:g} s measurements, median of {reps}")
    try:
        ingest_show = "{delivered_per_s:,.0f}/s delivered, {offered_per_s:,.0f}/s offered, " \
                      "{cpu_s_per_1000:.3f} CPU s/1000, zero loss {zero_loss}"
        if "ingest" in args.only:
            for qos in args.qos:
                env.qos = qos
                for links in args.links:
                    res[f"ingest_{qos_name(qos)}_{links}"] = repeated(
                        reps, f"ingest {qos_name(qos)} {links} link(s)", lambda links=links: ingest.run(env, links),
                        ingest_show)
            env.qos = args.qos[0]
        if "ceilings" in args.only:
            # The gateway's messages at each QoS asked for (a revision's unknown default has no
            # ceiling of its own), and QoS 0 without properties (the messages before the outbox).
            variants = [(qos, True) for qos in args.qos if qos is not None] + [(0, False)]
            for q, ts in variants:
                res[f"paho_QoS {q}{'' if ts else ' no ts'}"] = repeated(
                    reps, f"paho ceiling QoS {q}{'' if ts else ', no ts property'}",
                    lambda q=q, ts=ts: ceilings.paho(env, 16, q, ts), "{delivered_per_s:,.0f}/s, zero loss {zero_loss}")
            res["paho_QoS 0 no ts single-threaded"] = repeated(
                reps, "paho ceiling QoS 0, no ts property, single-threaded",
                lambda: ceilings.paho(env, 16, 0, False, threaded=False),
                "{delivered_per_s:,.0f}/s, zero loss {zero_loss}")
            for batch in (2000, 100, 1):
                res[f"sqlite_{batch}"] = repeated(reps, f"sqlite ceiling batch {batch}",
                                                  lambda batch=batch: ceilings.sqlite(env, batch),
                                                  "{rows_per_s:,.0f} rows/s")
        if "commands" in args.only:
            res["commands_idle"] = repeated(reps, "commands, 1 idle link",
                                            lambda: commands.run(env, 1, False, args.commands),
                                            "p50 {p50_ms:.2f} p99 {p99_ms:.2f} ms, {failed} failed")
            res["commands_busy"] = repeated(reps, "commands, 16 busy links",
                                            lambda: commands.run(env, 16, True, args.commands),
                                            "p50 {p50_ms:.2f} p99 {p99_ms:.2f} ms, {failed} failed, "
                                            "{readings_per_s_meanwhile:,.0f} readings/s meanwhile")
            res["commands_wire"] = repeated(reps, "commands, 16 links at UART speed",
                                            lambda: commands.run(env, 16, True, args.commands, commands.WIRE_RATE),
                                            "p50 {p50_ms:.2f} p99 {p99_ms:.2f} ms, {failed} failed, "
                                            "{readings_per_s_meanwhile:,.0f} readings/s meanwhile")
            stock = Env(**{**vars(env), "broker_conf": ""})
            res["commands_idle_stock_broker"] = repeated(1, "commands, 1 idle link, stock mosquitto (Nagle on)",
                                                         lambda: commands.run(stock, 1, False, min(args.commands, 200)),
                                                         "p50 {p50_ms:.2f} p99 {p99_ms:.2f} ms")
        if "startup" in args.only:
            res["startup_16"] = repeated(reps, "start-up, 16 devices", lambda: startup.run(env, 16),
                                         "READY {ready_s:.2f} s, idle RSS {idle_rss_mb:.1f} MB")
        if "growth" in args.only:
            prefilled = growth.prefilled_db(env, args.growth_rows) if args.growth_rows else None
            cases = [(0, None)] + ([(args.growth_rows, prefilled)] if args.growth_rows else [])
            for rows, template in cases:
                for links in args.growth_devices:
                    res[f"growth_{links}_{rows}"] = repeated(
                        args.growth_repeat, f"growth {links} device(s), {rows:,} rows before",
                        lambda links=links, template=template: growth.run(env, links, template), ingest_show)
        if "floods" in args.only:
            for flood in floods.floods(args.quick, args.floods):
                res[f"flood_{flood.name}"] = repeated(
                    args.flood_repeat, f"flood {flood.name}", lambda flood=flood: floods.run(env, flood),
                    "{achieved_per_s:,.0f}/s published, RSS peak {peak_total_rss_mb:.1f} MB (idle "
                    "{idle_total_rss_mb:.1f}), threads peak {peak_total_threads} (idle {idle_total_threads}), "
                    "commands p99 {probe_p99_ms:.1f} ms, {probe_failed} failed")
        if "wear" in args.only:
            wear.measure(env, args, res, repeated)
        if "acks" in args.only:
            acks.measure(env, args, res, repeated)
        if "soak" in args.only:
            res["soak"] = soak.run(env, args.soak_devices, args.soak_months, args.soak_live_links)
        if "profile" in args.only:
            if profiling.available():
                spy_out = RESULTS / f"{stamp}-profile.speedscope.json"
                progress(f"profiling the 16-link ingest with py-spy -> {spy_out}")
                res["profile"] = profiling.run(env, 16, spy_out)
            else:
                progress("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
    finally:
        out["machine"]["loadavg_end"] = os.getloadavg()
        path = RESULTS / f"{stamp}.json"
        path.write_text(json.dumps(out, indent=1, default=str) + "\n")
        shutil.rmtree(workdir, ignore_errors=True)

    fill_table(table, res, args)
    m = out["machine"]
    print(f"\npico-gateway benchmark: gateway {source.commit[:12]}, {m['cpu']} x {m['cores']} cores, "
          f"{args.duration:g} s per measurement, median of {reps} run(s) (growth: {args.growth_repeat}); "
          f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}\n")
    print(table.render())
    if "profile" in res:
        print_profile(res["profile"])
    print(f"\nsaved: {path}")
    return 0


def fill_table(t: Table, res: dict, args: argparse.Namespace) -> None:
    first = qos_name(args.qos[0])
    for qos in args.qos:
        rows = {links: res.get(f"ingest_{qos_name(qos)}_{links}") for links in args.links}
        if not any(rows.values()):
            continue
        t.section(f"ingest, {qos_name(qos)} (one metric per frame; readings/s delivered to the subscriber)")
        for links, r in rows.items():
            if r is None:
                continue
            m = r["median"]
            ok16 = m["delivered_per_s"] >= 15_000 if links == 16 and qos in (0, None) else None
            t.add(f"{links} link(s): delivered (offered)",
                  f"{n(m['delivered_per_s'])}/s ({n(m['offered_per_s'])}/s)",
                  ">= 15,000/s" if ok16 is not None else "", ok16)
            t.add(f"{links} link(s): gateway CPU s per 1,000 readings",
                  f"{n(m['cpu_s_per_1000'], 3)} ({n(m['cpu_cores'], 2)} cores; broker {n(m['broker_cores'], 2)}, "
                  f"subscriber {n(m['subscriber_cores'], 2)}, Picos {n(m['picos_cores'], 2)})")
            t.add(f"{links} link(s): gateway peak RSS", f"{n(m['peak_rss_mb'], 1)} MB")
            lost = sum(r2["missing_on_mqtt"] + r2["missing_in_db"] for r2 in r["runs"])
            t.add(f"{links} link(s): loss (written/stored/received, all runs)",
                  f"{lost} missing, "
                  f"{sum(r2['duplicates_on_mqtt'] + r2['duplicates_in_db'] for r2 in r['runs'])} duplicated",
                  "zero", r["median"]["zero_loss"])
        # Live readings go out without the ts property (only late ones carry it): at QoS 0 the
        # like-for-like ceiling is the bare publisher without properties.
        if qos == 0:  # the faster way of driving paho
            paho = max((res[k] for k in ("paho_QoS 0 no ts", "paho_QoS 0 no ts single-threaded") if k in res),
                       key=lambda r: r["median"]["delivered_per_s"], default=None)
        else:
            paho = res.get(f"paho_QoS {qos}")
        if paho and rows.get(16):
            ratio = rows[16]["median"]["delivered_per_s"] / paho["median"]["delivered_per_s"]
            # (At QoS 1 the bare publisher sends the ts property, which live gateway messages do not carry.)
            label = "" if qos in (0, None) else ", ts property"
            t.add(f"16 links vs bare paho ceiling ({n(paho['median']['delivered_per_s'])}/s{label})", f"{ratio:.2f} x",
                  ">= 0.8 x" if qos in (0, None) else "", ratio >= 0.8 if qos in (0, None) else None)
    if any(k.startswith(("paho_", "sqlite_")) for k in res):
        t.section("ceilings (16 topics / 16 devices, same subscriber, same window)")
        for key in [k for k in res if k.startswith("paho_")]:
            m = res[key]["median"]
            what = key[5:].replace(" no ts", ", no user property").replace(" single", ", single") \
                if "no ts" in key else f"{key[5:]}, ts property"
            t.add(f"bare paho publisher, {what}", f"{n(m['delivered_per_s'])}/s "
                  f"({n(m['cpu_s_per_1000'], 3)} CPU s/1,000 in the publisher; broker {n(m['broker_cores'], 2)}, "
                  f"subscriber {n(m['subscriber_cores'], 2)} cores)", "zero loss", m["zero_loss"])
        for batch in (2000, 100, 1):
            if f"sqlite_{batch}" in res:
                m = res[f"sqlite_{batch}"]["median"]
                t.add(f"bare sqlite3 executemany, {batch} rows/commit",
                      f"{n(m['rows_per_s'])} rows/s ({n(m['commits_per_s'])} commits/s)")
    for key, title in (("commands_idle", "1 idle link"), ("commands_busy", "16 busy links (flooded)"),
                       ("commands_wire", "16 busy links at UART speed (380 readings/s each)"),
                       ("commands_idle_stock_broker", "1 idle link, stock mosquitto")):
        if key not in res:
            continue
        if key == "commands_idle":
            t.section(f"command round trip, cmd/led -> state/led and result/led ({args.commands} commands, {first})")
        m = res[key]["median"]
        busy = key in ("commands_busy", "commands_wire")
        # The round trip ends at state/led (it arrives just before result/led).
        t.add(f"{title}: p50 / p90 / p99",
              f"{m['p50_ms']:.2f} / {m['p90_ms']:.2f} / {m['p99_ms']:.2f} ms to result/led, "
              f"p50 / p99 {m['state_p50_ms']:.2f} / {m['state_p99_ms']:.2f} ms to state/led"
              + (f" ({n(m['readings_per_s_meanwhile'])} readings/s)" if busy else ""),
              "p99 < 10 ms (state/led)" if busy else "", m["state_p99_ms"] < 10 if busy else None)
        if m.get("failed"):
            t.add(f"{title}: failed commands", n(m["failed"]))
    if "startup_16" in res:
        m = res["startup_16"]["median"]
        t.section("start-up, 16 devices")
        t.add("READY (bridge + every device online)",
              f"{m['ready_s']:.2f} s (bridge online {m['bridge_online_s']:.2f} s)",
              "< 1.5 s", m["ready_s"] < 1.5)
        t.add("RSS at idle, 5 s after READY", f"{m['idle_rss_mb']:.1f} MB", "< 60 MB", m["idle_rss_mb"] < 60)
    growth_keys = [k for k in res if k.startswith("growth_")]
    if growth_keys:
        t.section(f"growth ({first}): delivered readings/s, gateway CPU s per 1,000 readings")
        for key in growth_keys:
            _, links, rows = key.split("_")
            m = res[key]["median"]
            t.add(f"{links} device(s), {int(rows):,} rows before",
                  f"{n(m['delivered_per_s'])}/s, {n(m['cpu_s_per_1000'], 3)} CPU s/1,000", "zero loss", m["zero_loss"])
    fill_floods(t, res, args)
    wear.fill(t, res, args, n)
    acks.fill(t, res, args, n)
    if "soak" in res:
        soak.fill_table(t, res["soak"])


def fill_floods(t: Table, res: dict, args: argparse.Namespace) -> None:
    """Per flood: the publisher's rate, then the three flood targets (docs/performance.md), then what the gateway
    did."""
    shown = [(f, res[f"flood_{f.name}"]["median"]) for f in floods.floods(args.quick, args.floods)
             if f"flood_{f.name}" in res]
    if not shown:
        return
    t.section(f"floods; final = {floods.SETTLE:g} s after the gateway caught up")
    for flood, m in shown:
        name = flood.name
        asked = f" (asked {n(flood.rate)}/s)" if flood.rate else ""
        t.add(f"{name}: {flood.what}",
              f"{n(m['messages'])} messages ({n(m['bytes'] / 1e6, 1)} MB) at {n(m['achieved_per_s'])}/s{asked}; "
              + (f"gateway caught up after {n(m['caught_up_s'], 1)} s" if not math.isnan(m["caught_up_s"]) else
               f"gateway not caught up {floods.CATCH_UP:g} s after") + f" ({n(m['gateway_cores'], 2)} cores)")
        children = f"; main process {n(m['peak_rss_mb'], 1)} / {n(m['final_rss_mb'], 1)}, " \
                   f"{n(m['children_max'])} child(ren)" if m["children_max"] else ""
        t.add(f"{name}: RSS peak / final (idle)",
              f"{n(m['peak_total_rss_mb'], 1)} / {n(m['final_total_rss_mb'], 1)} MB "
              f"({n(m['idle_total_rss_mb'], 1)}){children}", f"< {floods.RSS_LIMIT_MB:g} MB", m["rss_ok"])
        t.add(f"{name}: threads peak / final (idle)",
              f"{n(m['peak_total_threads'])} / {n(m['final_total_threads'])} ({n(m['idle_total_threads'])})",
              f"<= idle + {floods.THREADS_OVER_IDLE}", m["threads_ok"])
        t.add(f"{name}: cmd/led to {floods.PROBE}, p50 / p99 (max)",
              f"{n(m['probe_p50_ms'], 1)} / {n(m['probe_p99_ms'], 1)} ({n(m['probe_max_ms'], 1)}) ms, "
              f"{n(m['probe_failed'])} of {n(m['probe_commands'])} unanswered in {commands.TIMEOUT:g} s",
              "all answered", m["commands_ok"])
        t.add(f"{name}: what the gateway did",
              f"{flood_effect(name, m)}; log +{n(m['log_lines'])} lines ({n(m['log_kb'])} KB)")


def flood_effect(name: str, m: dict) -> str:
    """What a flood made the gateway do, as a subscriber or the database sees it."""
    if name == "owner":
        return f"{n(m['conflicts_messages'])} conflicts messages, the last {n(m['conflicts_last_kb'], 1)} KB"
    if name == "ha_status":
        return f"{n(m['discovery_messages'])} discovery configs published"
    if name == "cmd_led":
        return f"{n(m['target_answers'])} result/led answers for {floods.TARGET}"
    return (f"{n(m['rows_stored'])} rows, {n(m['names_stored'])} names stored, "
            f"the longest {n(m['longest_name_stored'])} chars")


def print_profile(p: dict) -> None:
    if "self_pct" not in p:
        print(f"\nprofile: {p.get('error')}")
        return
    print(f"\npy-spy profile of the 16-link ingest ({p['samples']:.1f} s of busy thread time sampled; "
          f"{p['ingest_while_profiled']['delivered_per_s']:,.0f} readings/s while sampled): {p['profile']}")
    for title, key, count in (("threads", "threads_pct", 6), ("self (where samples land)", "self_pct", 12),
                              ("inclusive (on the stack)", "inclusive_pct", 12)):
        print(f"  {title}:")
        for name, pct in p[key][:count]:
            print(f"    {pct:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
