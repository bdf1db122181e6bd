"""What the monitors of one process share: the run names in use, and how they end on SIGTERM
or at interpreter exit.

A run name is unique among the open monitors of this process (two monitors started in the same
millisecond get ``name`` and ``name-2``); across processes the run store arbitrates
(:func:`actmon.sinks.store.claim_run`).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from datetime import datetime, timezone
from types import FrameType
from typing import Any, Protocol

_lock = threading.RLock()  # re-entrant: the SIGTERM handler may run while it is held
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


# ---- SIGTERM and interpreter exit --------------------------------------------------------
# A scheduler (or `timeout`) ends a job with SIGTERM, and a script may end without close():
# either way the open monitors flush their partial window, drain their sinks (bounded by
# ``sinks.drain_timeout_seconds``) and record how the run ended. SIGTERM then goes on to the
# handler that was installed before ours, or, if that was the default, kills the process with
# it, as if actmon were not there.


class _Closable(Protocol):
    def _end(self, status: str) -> None: ...

    @property
    def _busy(self) -> bool: ...


_open: list[weakref.ref[_Closable]] = []  # open monitors, in start order
_previous: Any = None  # the SIGTERM handler ours replaced
_installed = False
_atexit_registered = False
_pending: tuple[int, FrameType | None] | None = None  # a SIGTERM that came inside a monitor call


def register(monitor: _Closable) -> None:
    """Close ``monitor`` on SIGTERM and at interpreter exit, unless it is closed before."""
    global _atexit_registered
    with _lock:
        _open.append(weakref.ref(monitor))
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
    _install()


def unregister(monitor: _Closable) -> None:
    """``monitor`` closed: the last one out puts the earlier SIGTERM handler back."""
    with _lock:
        _open[:] = [ref for ref in _open if ref() not in (None, monitor)]
        last = not _open
    if last:
        _uninstall()


def _monitors() -> list[_Closable]:
    with _lock:
        return [m for m in (ref() for ref in _open) if m is not None]


def _install() -> None:
    """Our SIGTERM handler, from the main thread only (Python allows no other), once."""
    global _installed, _previous
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        # Ours is already in place: someone installed theirs over ours and later put ours
        # back (Lightning's signal connector does, around fit). The handler ours replaced
        # then is still the one to chain to.
        _installed = True
        return
    if current is signal.SIG_IGN:  # the process ignores SIGTERM: so do we
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _previous, _installed = current, True


def _uninstall() -> None:
    """Put the handler we replaced back, unless someone installed theirs over ours (it may
    chain to ours; ours then only passes the signal on)."""
    global _installed, _previous
    if not _installed or threading.current_thread() is not threading.main_thread():
        return  # closed off the main thread: ours stays and only passes signals on
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
        _previous = None
    # else: the handler on top may put ours back later; ours then still chains to _previous
    _installed = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _pending
    if any(m._busy for m in _monitors()):
        # The signal interrupted a monitor call on this thread (a step, a flush): finish it
        # first; it ends by calling run_pending(). Closing now would tear its state apart.
        _pending = (signum, frame)
        return
    _terminate(signum, frame)


def run_pending() -> None:
    """Act on a SIGTERM that arrived inside a monitor call (called as that call returns)."""
    global _pending
    if _pending is not None and threading.current_thread() is threading.main_thread():
        (signum, frame), _pending = _pending, None
        _terminate(signum, frame)


def _terminate(signum: int, frame: FrameType | None) -> None:
    previous = _previous
    for monitor in reversed(_monitors()):
        monitor._end("terminated")
    if callable(previous):
        previous(signum, frame)
        return
    # The default action (or a handler set from C, which Python cannot call): die by SIGTERM.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _at_exit() -> None:
    """The interpreter is exiting with monitors still open: close them ("failed" when an
    uncaught exception ended the program)."""
    status = "failed" if getattr(sys, "last_type", None) is not None else "finished"
    for monitor in reversed(_monitors()):
        monitor._end(status)
