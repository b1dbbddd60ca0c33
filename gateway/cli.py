"""The command line: ``pico-gateway run | check-config | simulate | demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gateway import __version__, flash, history, recorder
from gateway.config import ConfigError, load_config_or_report, load_runnable
from gateway.systemd import setup_logging


def cmd_run(args: argparse.Namespace) -> int:
    # Every problem check-config finds stops run here, before anything starts, with exit 2:
    # the systemd unit restarts on any other failure (RestartPreventExitStatus=2), and a
    # restart every 5 s cannot fix a config.
    try:
        config, _ = load_runnable(args.config, running=True)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    setup_logging(args.verbose)
    from gateway.daemon import exit_process, run

    exit_process(run(config, config_path=args.config))  # (SIGHUP reads it again)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config, notes = load_runnable(args.config, running=False)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    for note in notes:
        print(f"{args.config}: note: {note}", file=sys.stderr)
    print(f"{args.config}: ok, gateway {config.gateway_id}, {len(config.devices)} device(s): "
          + ", ".join(f"{d.id} ({d.transport}, {d.protocol})" for d in config.devices))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        from gateway.demo import run_demo
    except KeyboardInterrupt:  # (Ctrl-C while Python imports, before the demo handles it itself)
        print("demo: interrupted while starting; nothing had started", flush=True)
        return 0
    return run_demo(args.duration, args.workdir)


def cmd_simulate(argv: list[str]) -> int:
    from gateway.simulator.cli import main_simulate

    def devices(path: str) -> list[dict]:
        config = load_config_or_report(path)
        if config is None:
            raise SystemExit(2)
        return [d.model_dump() for d in config.devices]

    return main_simulate(argv, load_devices=devices)


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

    sub.add_parser("simulate", add_help=False,
                   help="virtual Picos for every device of a config (--config FILE), or one firmware "
                        "(--firmware PATH --transport uart); see 'simulate --help'")

    p = sub.add_parser("demo", help="a broker, a virtual Pico on every link and the gateway, with a live table")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary directory, removed)")
    p.set_defaults(func=cmd_demo)

    from gateway.service import add_subcommands

    add_subcommands(sub)
    history.add_subcommands(sub)
    flash.add_subcommands(sub)
    recorder.add_subcommands(sub)
    return parser


SIGPIPE_EXIT = 128 + 13  # what a shell reports for a command ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # (here, not at the interpreter's exit, where a closed pipe is a traceback)
        return code
    except BrokenPipeError:
        # The reader went away (`pico-gateway status | head -3`): stop quietly, as a Unix tool
        # killed by SIGPIPE does. Python's own flush of stdout at exit must not fail again:
        # point stdout at /dev/null (the recipe of Python's signal module docs).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # (a stdout without a file descriptor)
            pass
        return SIGPIPE_EXIT


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        return cmd_simulate(argv[1:])  # its own argument parser
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
