"""What the monitors of one process share: the run names in use.

A run name is unique among the open monitors of this process (two monitors started in the same
millisecond get ``name`` and ``name-2``); across processes the run store arbitrates
(:func:`actmon.sinks.store.claim_run`).
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

_lock = threading.Lock()
_names: set[str] = set()  # run names of this process's open monitors


def default_run_name() -> str:
    """``actmon-<UTC date>-<time>-<milliseconds>``: sub-second, so runs started together in
    different processes rarely need the store's ``-2`` suffix."""
    return datetime.now(timezone.utc).strftime("actmon-%Y%m%d-%H%M%S-%f")[:-3]


def name_free(name: str) -> bool:
    """Whether no open monitor of this process runs under ``name``."""
    with _lock:
        return name not in _names


def reserve_unique(base: str) -> str:
    """Reserve ``base`` for a new monitor, else ``base-2``, ``base-3``, ...: the first free."""
    with _lock:
        name, n = base, 1
        while name in _names:
            n += 1
            name = f"{base}-{n}"
        _names.add(name)
        return name


def reserve(name: str) -> None:
    """Reserve ``name`` as it is (claimed in the store, or given by rank 0)."""
    with _lock:
        _names.add(name)


def release(name: str) -> None:
    """The monitor running ``name`` closed: the name may be used again (in this process)."""
    with _lock:
        _names.discard(name)
