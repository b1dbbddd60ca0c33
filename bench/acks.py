"""Ack cost: the gateway's CPU per reading with Picos that keep their frames until
acknowledged, against Picos that do not (docs/protocol.md 1.8).

The ingest measurement (ingest.py) twice: the bench Picos once as firmware without
acknowledgements, once saying ``ack=`` in their hello, answering the gateway's resend
request and receiving its ``K`` frames. With acks every reading names its Pico's boot
(the store checks it is not stored already: one indexed range query per device and
commit) and each commit is followed by a K frame per device. The figure is gateway CPU
seconds (the gateway and its database writer) per 1,000 readings delivered; the bound
is 10 % more with acks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import ingest
from common import Env, median

LINKS = 16
BOUND = 0.10  # at most 10 % more CPU per reading with acks


def measure(env: Env, args: argparse.Namespace, res: dict, repeated: Callable[..., dict]) -> None:
    """Runs without and with acks taken in turns (off, on, off, on ...), so that what else
    the machine does moves both alike; the extra cost is the median of each pair's ratio."""
    first = env.qos
    for qos in args.qos:
        env.qos = qos
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for i in range(args.repeat):
            for acks in (False, True):
                result = ingest.run(env, LINKS, acks=acks)
                runs[acks].append(result)
                label = f"ack cost QoS {qos} {LINKS} links, acks {'on' if acks else 'off'} [{i + 1}/{args.repeat}]"
                print(f"bench: {label}: {result['delivered_per_s']:,.0f}/s delivered, "
                      f"{result['cpu_s_per_1000']:.4f} CPU s/1000, {result['acks_received']:,} K frames, "
                      f"zero loss {result['zero_loss']}", file=sys.stderr, flush=True)
        for acks, these in runs.items():
            keys = [k for k, v in these[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            summary = {k: median(r[k] for r in these) for k in keys}
            summary["zero_loss"] = all(r["zero_loss"] for r in these)
            res[f"acks_QoS {qos}_{acks}"] = {"median": summary, "runs": these}
        res[f"acks_QoS {qos}_extra"] = median(on["cpu_s_per_1000"] / off["cpu_s_per_1000"] - 1
                                              for off, on in zip(runs[False], runs[True], strict=True))
    env.qos = first


def fill(t, res: dict, args: argparse.Namespace, n: Callable[..., str]) -> None:
    if not any(k.startswith("acks_") for k in res):
        return
    t.section(f"ack cost, {LINKS} links flooding: gateway CPU per reading, acks off / on")
    for qos in args.qos:
        off, on = res.get(f"acks_QoS {qos}_False"), res.get(f"acks_QoS {qos}_True")
        if not (off and on):
            continue
        a, b = off["median"], on["median"]
        extra = res[f"acks_QoS {qos}_extra"]  # (the median of the pairs' ratios)
        t.add(f"QoS {qos}: µs per reading, acks off / on",
              f"{n(a['cpu_s_per_1000'] * 1000, 1)} / {n(b['cpu_s_per_1000'] * 1000, 1)} µs ({extra:+.1%} pair by pair; "
              f"{n(a['delivered_per_s'])} / {n(b['delivered_per_s'])} readings/s, "
              f"{n(b['acks_received'] / b['seconds'])} K frames/s)",
              f"<= +{BOUND:.0%}", extra <= BOUND)
        t.add(f"QoS {qos}: loss with acks (all runs)", "none" if on["median"]["zero_loss"] else "some", "zero",
              on["median"]["zero_loss"])
