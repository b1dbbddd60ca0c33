"""``pico-gateway flash`` (work in progress)."""

from typing import Any


def add_subcommands(sub: Any) -> None:
    pass
