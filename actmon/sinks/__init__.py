"""Sinks consume Snapshots. A sink is anything with ``write(snapshot)`` and ``close()``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from actmon.snapshot import Snapshot


@runtime_checkable
class Sink(Protocol):
    """Where Snapshots go. A failing sink is isolated by the monitor and never stops training."""

    def write(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


__all__ = ["Sink"]
