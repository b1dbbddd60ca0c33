"""Which code speaks which protocol, for every kind of link: one table, asked the same way.

A device's config names its protocol (``protocol = "picogw"``); its link asks
:data:`PROTOCOLS` for what speaks that protocol over its kind of link, instead of
branching on the name. A kind is a typed key, so what a lookup returns has a static
type: a serial session factory for serial links, a pair of methods for i2c, ...

    SERIAL = ProtocolKind[SessionFactory]("serial")
    PROTOCOLS.register(SERIAL, "picogw", PicogwSerialSession)
    factory = PROTOCOLS.lookup(SERIAL, config.protocol)
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ProtocolKind(Generic[T]):
    """One kind of link's protocols (serial, i2c, ...), and the type of what speaks them."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"ProtocolKind({self.name!r})"


class ProtocolRegistry:
    def __init__(self) -> None:
        self._table: dict[tuple[str, str], object] = {}

    def register(self, kind: ProtocolKind[T], protocol: str, speaker: T) -> T:
        key = (kind.name, protocol)
        if key in self._table and self._table[key] is not speaker:
            raise ValueError(f"protocol {protocol!r} is registered twice for {kind.name} links")
        self._table[key] = speaker
        return speaker

    def lookup(self, kind: ProtocolKind[T], protocol: str) -> T:
        """What speaks ``protocol`` over ``kind`` links; ValueError naming the known ones."""
        try:
            return self._table[(kind.name, protocol)]  # type: ignore[return-value]  # registered as a T
        except KeyError:
            raise ValueError(f"{kind.name} links speak no protocol {protocol!r}; they speak "
                             f"{', '.join(self.protocols(kind)) or 'none'}") from None

    def protocols(self, kind: ProtocolKind[T]) -> list[str]:
        return sorted(name for k, name in self._table if k == kind.name)

    def all_protocols(self) -> list[str]:
        """Every protocol some kind of link speaks."""
        return sorted({name for _, name in self._table})


PROTOCOLS = ProtocolRegistry()
