"""``python -m gateway.simulator`` = ``pico-gateway simulate``."""

import sys

from gateway.simulator.cli import main_simulate

__all__ = ["main_simulate"]

if __name__ == "__main__":
    sys.exit(main_simulate(sys.argv[1:]))
