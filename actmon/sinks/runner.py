"""Runs each sink on its own thread behind a bounded queue, so no sink can stop or slow training.

The training thread only ever calls :meth:`SinkRunner.submit`, which never blocks: when the
queue is full the new item is dropped and counted. A write that raises is retried with
exponential back-off; after ``retries`` attempts the item is dropped and counted. Errors go
to ``on_error`` (the monitor counts them per sink and logs each cause once).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from actmon.rules import Alert
from actmon.sinks import Sink
from actmon.snapshot import Snapshot

log = logging.getLogger("actmon")

_STOP = object()
_MAX_BACKOFF = 30.0


class SinkRunner:
    """One sink, one worker thread, one bounded queue."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        on_error: Callable[[str, BaseException], None],
        queue_size: int = 64,
        retries: int = 3,
        backoff_seconds: float = 0.5,
    ) -> None:
        self.name = name
        self.sink = sink
        self.dropped = 0
        self.delivered = 0
        self._on_error = on_error
        self._retries = retries
        self._backoff = backoff_seconds
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"actmon-sink-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: Snapshot | Alert) -> None:
        """Hand a snapshot or alert over without blocking; drop (and count) it when full."""
        if self._closed or (isinstance(item, Alert) and not hasattr(self.sink, "write_alert")):
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("actmon: sink %s is behind; dropping windows (queue full)", self.name)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then close the sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:  # the worker is stuck: give up on the queue, stop retrying
            self._stopping.set()
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join(5.0)
            log.warning("actmon: sink %s did not finish within %.0f s", self.name, timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, (Snapshot, Alert))
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
                if attempt == self._retries or self._stopping.wait(delay):
                    break
                delay = min(delay * 2, _MAX_BACKOFF)
        self.dropped += 1
