"""Runs each sink on its own thread behind bounded queues, so no sink can stop or slow training.

The training thread only ever calls :meth:`SinkRunner.submit`, which never blocks: when a queue
is full the new item is dropped and counted. Alerts have their own queue and are delivered
before any waiting window, so a backlog of windows never drops an alert. A write that raises is
retried with exponential back-off; after ``retries`` attempts the item is dropped and counted.
Errors go to ``on_error`` (the monitor counts them per sink and logs each cause once), drops to
``on_drop`` (counted per sink, logged at most every 30 s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from actmon.rules import Alert
from actmon.sinks import Sink
from actmon.snapshot import Snapshot

log = logging.getLogger("actmon")

_MAX_BACKOFF = 30.0
_LOG_EVERY = 30.0  # seconds between two "dropped" warnings of one sink
ALERT_QUEUE_SIZE = 10_000  # alerts waiting per sink (the monitor keeps the last 10,000 too)
CLOSE_GRACE = 2.0  # seconds a sink gets for its own close() after the drain deadline


class SinkRunner:
    """One sink, one worker thread, a bounded queue of windows and one of alerts."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        on_error: Callable[[str, BaseException], None],
        queue_size: int = 64,
        retries: int = 3,
        backoff_seconds: float = 0.5,
        on_drop: Callable[[str, int], None] = lambda name, n: None,
    ) -> None:
        self.name = name
        self.sink = sink
        self.dropped = 0  # windows
        self.dropped_alerts = 0
        self.delivered = 0
        self._on_error = on_error
        self._on_drop = on_drop
        self._retries = retries
        self._backoff = backoff_seconds
        self._queue_size = queue_size
        self._windows: deque[Snapshot] = deque()
        self._alerts: deque[Alert] = deque()
        self._cond = threading.Condition()
        self._stop = False  # no more items come: deliver what is queued, then close the sink
        self._abandon = threading.Event()  # past the drain deadline: drop what is left
        self._closed = False
        self._last_log = -_LOG_EVERY
        self._thread = threading.Thread(target=self._run, name=f"actmon-sink-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: Snapshot | Alert) -> None:
        """Hand a snapshot or alert over without blocking; drop (and count) it when full."""
        if self._closed:
            return
        with self._cond:
            if isinstance(item, Alert):
                if not hasattr(self.sink, "write_alert"):
                    return
                if len(self._alerts) < ALERT_QUEUE_SIZE:
                    self._alerts.append(item)
                    self._cond.notify()
                    return
            elif len(self._windows) < self._queue_size:
                self._windows.append(item)
                self._cond.notify()
                return
        self._drop(item, "queue full")

    def stop(self) -> None:
        """Take no more items; the worker delivers what is queued, then closes the sink."""
        with self._cond:
            self._closed = self._stop = True
            self._cond.notify()

    def join(self, deadline: float) -> None:
        """Wait until the worker is done or ``deadline`` (``time.monotonic()``) has passed; then
        drop what is still queued, stop retrying, and give the sink ``CLOSE_GRACE`` seconds for
        its own close()."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            self._drop_queued()  # counted now, whatever the stuck write does later
            self._thread.join(CLOSE_GRACE)
            if self._thread.is_alive():
                log.warning("actmon: sink %s did not finish in time; left behind", self.name)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then close the sink. Idempotent."""
        if not self._stop:
            self.stop()
        self.join(time.monotonic() + timeout)

    def _next(self) -> Snapshot | Alert | None:
        """The next item, alerts first; None when stopped and empty, or abandoned."""
        with self._cond:
            while not (self._alerts or self._windows or self._stop or self._abandon.is_set()):
                self._cond.wait()
            if self._abandon.is_set():
                return None
            if self._alerts:
                return self._alerts.popleft()
            if self._windows:
                return self._windows.popleft()
            return None

    def _drop_queued(self) -> None:
        """Past the drain deadline: drop (and count) everything still queued."""
        with self._cond:
            left: list[Snapshot | Alert] = [*self._alerts, *self._windows]
            self._alerts.clear()
            self._windows.clear()
            self._cond.notify()
        for item in left:
            self._drop(item, "not delivered before the drain deadline")

    def _run(self) -> None:
        while (item := self._next()) is not None:
            self._deliver(item)
        try:
            self.sink.close()  # on this thread: sinks may hold thread-bound handles (sqlite)
        except Exception as exc:
            self._on_error(self.name, exc)

    def _deliver(self, item: Snapshot | Alert) -> None:
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                if isinstance(item, Alert):
                    self.sink.write_alert(item)  # type: ignore[attr-defined]
                    return
                self.sink.write(item)
                self.delivered += 1
                return
            except Exception as exc:
                self._on_error(self.name, exc)
                if attempt == self._retries or self._abandon.wait(delay):
                    break
                delay = min(delay * 2, _MAX_BACKOFF)
        self._drop(item, f"still failing after {self._retries} retries")

    def _drop(self, item: Snapshot | Alert, why: str) -> None:
        """Count a dropped item; warn at once, then at most every 30 s, with the totals."""
        with self._cond:
            if isinstance(item, Alert):
                self.dropped_alerts += 1
            else:
                self.dropped += 1
            now = time.monotonic()
            warn = now - self._last_log >= _LOG_EVERY
            if warn:
                self._last_log = now
            windows, alerts = self.dropped, self.dropped_alerts
        self._on_drop(self.name, 1)
        if warn:
            log.warning(
                "actmon: sink %s dropped a %s (%s); dropped so far: %d windows, %d alerts",
                self.name,
                "alert" if isinstance(item, Alert) else "window",
                why,
                windows,
                alerts,
            )
