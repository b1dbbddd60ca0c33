"""The command line: ``pico-gateway run | check-config | simulate | demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig, load_config


def setup_logging(verbose: bool = False) -> None:
    # Under systemd, journald adds the time itself.
    under_systemd = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)


def _load(path: str) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    setup_logging(args.verbose)
    from gateway.daemon import run

    return run(config)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    print(f"{args.config}: ok, gateway {config.gateway_id}, {len(config.devices)} device(s): "
          + ", ".join(f"{d.id} ({d.transport}, {d.protocol})" for d in config.devices))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pico-gateway", description="Bridge Raspberry Pi Picos onto MQTT and SQLite.")
    parser.add_argument("--version", action="version", version=f"pico-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the gateway (what systemd starts)")
    p.add_argument("--config", required=True, help="the TOML config file")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file; exit 0 when it is usable")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
