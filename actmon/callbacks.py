"""Alert callbacks (``monitor.on_alert(fn)``) run on their own thread, so none can stall training.

A callback may post to a chat, page someone or write a file: it can be slow, hang or raise. The
training thread only hands each alert over with :meth:`CallbackRunner.submit`, which never
blocks; one daemon thread calls the callbacks in order. When ``queue_size`` alerts are waiting
(a callback is stuck), further alerts are not queued for the callbacks: they are counted as
dropped (the alert itself is still recorded, logged and sent to the sinks). A callback that
raises is counted and the next one still runs. :meth:`close` waits a bounded time.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable

from actmon.rules import Alert

QUEUE_SIZE = 256  # alerts waiting for the callbacks; a healthy run has a handful per window
CLOSE_SECONDS = 5.0  # how long close() waits for the callbacks to finish the queued alerts

RAISED = "(alert callback)"  # monitor.errors keys
DROPPED = "(alert callback) dropped"
UNFINISHED = "(alert callback) unfinished"

_STOP = object()

# report(key, message): count one event under ``key`` in monitor.errors; log ``message`` once.
Report = Callable[[str, str], None]


class CallbackRunner:
    """The monitor's alert callbacks, one worker thread, one bounded queue."""

    def __init__(self, report: Report, queue_size: int = QUEUE_SIZE) -> None:
        self._report = report
        self._queue_size = queue_size
        self._callbacks: list[Callable[[Alert], None]] = []
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False

    def add(self, callback: Callable[[Alert], None]) -> None:
        """Call ``callback(alert)`` for every later firing alert (the thread starts with the
        first callback: a monitor without callbacks has none)."""
        self._callbacks.append(callback)
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._run, name="actmon-alert-callbacks", daemon=True
            )
            self._thread.start()

    def submit(self, alert: Alert) -> None:
        """Queue ``alert`` for the callbacks without blocking; count it dropped when full."""
        if self._thread is None or self._closed:
            return
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self._report(
                DROPPED,
                f"actmon: on_alert callbacks are behind ({self._queue_size} alerts waiting);"
                f" later alerts are not passed to them (monitor.errors[{DROPPED!r}] counts"
                " them; the alerts are still logged and sent to the sinks)",
            )

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Let the callbacks finish the queued alerts, waiting at most ``timeout`` seconds;
        a callback still running then is left to its daemon thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():  # a callback closing the monitor
            self._stopping = True  # the thread ends when that callback returns
            return
        deadline = time.monotonic() + timeout
        stop_queued = False
        with contextlib.suppress(queue.Full):  # full: a callback is stuck, left behind below
            self._queue.put(_STOP, timeout=timeout)
            stop_queued = True
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            left = self._queue.qsize() - stop_queued
            self._report(
                UNFINISHED,
                f"actmon: an on_alert callback was still running {timeout:g} s after close();"
                f" it is left running on its daemon thread, {left} queued alerts not passed on",
            )

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is _STOP:
                return
            assert isinstance(alert, Alert)
            for callback in list(self._callbacks):
                try:
                    callback(alert)
                except Exception as exc:  # a user callback never breaks the monitor
                    self._report(
                        RAISED,
                        f"actmon: an on_alert callback raised {type(exc).__name__}: {exc}"
                        f" (monitor.errors[{RAISED!r}] counts these)",
                    )
            if self._stopping:
                return
