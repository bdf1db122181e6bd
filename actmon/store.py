"""The run store: one SQLite file per run, and the small read API gate and report use.

Schema (version 2), long format so new metrics need no migration:

* ``meta(key, value)`` — ``schema_version``.
* ``runs(run, started, ended, status, config_json, model_json, dropped_json, complete)`` —
  status is ``running`` until the monitor closes (``finished`` / ``failed``, ``terminated`` on
  SIGTERM); a killed run stays ``running``. ``dropped_json``: ``{"windows": {sink: n},
  "alerts": {sink: n}}``, what each sink dropped (kept up to date as windows are written);
  ``complete``: 1 when the run finished and no sink dropped anything, else 0 (NULL: not known,
  a run written by schema version 1).
* ``layers(run, name, kind, unit_axis, units)``.
* ``windows(run, step, first_step, last_step, sampled_steps)``.
* ``metrics(run, step, layer, metric, value)`` — ``layer`` is ``''`` for run-level metrics.
* ``histogram_edges(run, layer, edges)`` — a layer's bin edges, written once (float64 bytes).
* ``histograms(run, step, layer, first_bin, counts)`` — each window's counts from the first to
  the last non-empty bin (float64 bytes): empty tails are not stored.
* ``alerts(run, step, rule, layer, severity, state, metric, value, op, threshold, first_seen,
  summary, runbook)`` — every firing and resolved event.

Every window is one transaction in WAL mode, so a process killed at any point leaves a store
that opens and holds every window committed before the kill.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from actmon.errors import ActmonError

T = TypeVar("T")

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks runs.dropped_json and runs.complete

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, started REAL NOT NULL, ended REAL, status TEXT NOT NULL,
    config_json TEXT NOT NULL, model_json TEXT NOT NULL,
    dropped_json TEXT NOT NULL DEFAULT '{}', complete INTEGER
);
CREATE TABLE IF NOT EXISTS layers (
    run TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, unit_axis INTEGER, units INTEGER,
    PRIMARY KEY (run, name)
);
CREATE TABLE IF NOT EXISTS windows (
    run TEXT NOT NULL, step INTEGER NOT NULL, first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL, sampled_steps INTEGER NOT NULL, PRIMARY KEY (run, step)
);
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL, step INTEGER NOT NULL, layer TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL
);
CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (run, metric, layer, step);
CREATE TABLE IF NOT EXISTS histogram_edges (
    run TEXT NOT NULL, layer TEXT NOT NULL, edges BLOB NOT NULL, PRIMARY KEY (run, layer)
);
CREATE TABLE IF NOT EXISTS histograms (
    run TEXT NOT NULL, step INTEGER NOT NULL, layer TEXT NOT NULL, first_bin INTEGER NOT NULL,
    counts BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    run TEXT NOT NULL, step INTEGER NOT NULL, rule TEXT NOT NULL, layer TEXT,
    severity TEXT NOT NULL, state TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    op TEXT NOT NULL, threshold REAL, first_seen INTEGER NOT NULL, summary TEXT NOT NULL,
    runbook TEXT NOT NULL
);
"""


class StoreError(ActmonError):
    """A run store cannot be read: missing, corrupt, or written by another schema version."""


# The objects a store may hold: SCHEMA's tables and indexes, SQLite's own indexes for their keys
# and its statistics tables. A view, trigger or virtual table (say, ``metrics`` replaced by a
# ``WITH RECURSIVE`` view that never ends) is refused before any query reads it.
_SCHEMA_OBJECTS = {
    name: kind.lower()
    for kind, name in re.findall(
        r"CREATE\s+(?:UNIQUE\s+)?(TABLE|INDEX)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", SCHEMA, re.I
    )
}
_SQLITE_TABLES = frozenset({"sqlite_sequence", "sqlite_stat1", "sqlite_stat4"})
# Every query is stopped after this long (a SQLite progress handler), so no crafted store can
# hang a reader; the largest real stores answer each query in well under a second.
QUERY_SECONDS = 30.0


@dataclass(frozen=True)
class RunInfo:
    run: str
    started: float
    ended: float | None
    status: str
    config: dict[str, object]
    layers: list[dict[str, object]]
    # Windows and alerts each sink dropped (queue full, failing after its retries, left at the
    # drain deadline): every sink, the store itself included, with 0 for none.
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_alerts: dict[str, int] = field(default_factory=dict)
    # True: finished with nothing dropped anywhere. False: not finished, or something was
    # dropped. None: not known (a store written by schema version 1).
    complete: bool | None = None


@dataclass(frozen=True)
class StoredAlert:
    step: int
    rule: str
    layer: str | None
    severity: str
    state: str
    metric: str
    value: float
    op: str
    threshold: float
    first_seen: int
    summary: str
    runbook: str


@dataclass(frozen=True)
class Window:
    step: int
    first_step: int
    last_step: int
    sampled_steps: int


def _decoded(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a corrupt row (bad JSON, a value of the wrong type, a short blob) into StoreError."""

    @functools.wraps(method)
    def wrapper(self: RunStore, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(
                f"run store {str(self.path)!r} holds a corrupt row ({type(exc).__name__}: {exc})"
            ) from None

    return wrapper


class RunStore:
    """Read access to one store file. Plain Python / numpy results, no pandas.

    The file is opened read-only, its schema must be SCHEMA's tables (nothing else), and each
    query stops after ``query_seconds``: a damaged or crafted store is a StoreError, never a
    hang.
    """

    def __init__(self, path: str | os.PathLike[str], query_seconds: float = QUERY_SECONDS) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"run store {str(self.path)!r} does not exist")
        self._query_seconds = query_seconds
        self._deadline = math.inf
        self._timed_out = False
        try:
            # The path is percent-quoted into the URI: a "#", "?" or "%" in a file name would
            # otherwise end the path (mode=ro lost, another file opened) or break the URI.
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreError(f"run store {str(self.path)!r} cannot be opened: {exc}") from None
        self._db.set_progress_handler(self._over_time, 10_000)
        try:
            self._check_schema()
            rows = self._query("SELECT value FROM meta WHERE key = 'schema_version'", opening=True)
            version = None if not rows else int(rows[0][0])
        except (ValueError, TypeError) as exc:
            self._db.close()
            raise StoreError(
                f"{str(self.path)!r} is not a readable actmon run store ({exc})"
            ) from None
        except StoreError:
            self._db.close()
            raise
        if version not in READABLE_VERSIONS:
            self._db.close()
            found = "none" if version is None else version
            raise StoreError(
                f"run store {str(self.path)!r} has schema version {found}; this actmon reads"
                f" versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        self.version = version

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _over_time(self) -> bool:
        """SQLite's progress handler: True stops the running query."""
        self._timed_out = time.monotonic() > self._deadline
        return self._timed_out

    def _query(self, sql: str, args: tuple[object, ...] = (), opening: bool = False) -> list[Any]:
        self._deadline = time.monotonic() + self._query_seconds
        try:
            return self._db.execute(sql, args).fetchall()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if self._timed_out:
                raise StoreError(
                    f"run store {str(self.path)!r}: a query ran over {self._query_seconds:g} s"
                    " and was stopped (a damaged or crafted store?)"
                ) from None
            if opening:
                raise StoreError(
                    f"{str(self.path)!r} is not a readable actmon run store ({exc})"
                ) from None
            raise StoreError(f"run store {str(self.path)!r} cannot be read: {exc}") from None
        finally:
            self._deadline = math.inf
            self._timed_out = False

    def _check_schema(self) -> None:
        """Refuse a store holding anything but SCHEMA's tables and indexes."""
        objects = self._query("SELECT type, name, tbl_name, sql FROM sqlite_master", opening=True)
        tables = {name for name, kind in _SCHEMA_OBJECTS.items() if kind == "table"}
        found = []
        for kind, name, table, sql in objects:
            if kind == "table" and (
                name in _SQLITE_TABLES
                or (name in tables and str(sql).upper().startswith("CREATE TABLE"))
            ):
                continue
            if kind == "index" and table in tables:
                named = _SCHEMA_OBJECTS.get(name) == "index"
                if named or (sql is None and str(name).startswith("sqlite_autoindex_")):
                    continue
            virtual = " (virtual)" if str(sql).upper().startswith("CREATE VIRTUAL") else ""
            found.append(f"{kind}{virtual} {_short(name)}")
        if found:
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise StoreError(
                f"run store {str(self.path)!r} is not an actmon run store: its schema holds"
                f" {', '.join(found[:5])}{more}; a run store holds only the tables"
                f" {', '.join(sorted(tables))} (no views, triggers or other objects)"
            )

    @_decoded
    def runs(self) -> list[RunInfo]:
        out = []
        extra = ", dropped_json, complete" if self.version >= 2 else ", '{}', NULL"
        for run, started, ended, status, config_json, model_json, dropped, complete in self._query(
            f"SELECT run, started, ended, status, config_json, model_json{extra} FROM runs"
            " ORDER BY started"
        ):
            drops = json.loads(str(dropped))
            if not isinstance(drops, dict):
                raise ValueError(f"dropped_json is {type(drops).__name__}, not an object")
            out.append(
                RunInfo(
                    str(run),
                    float(started),
                    None if ended is None else float(ended),
                    str(status),
                    json.loads(str(config_json)),
                    json.loads(str(model_json)),
                    _counts(drops.get("windows", {})),
                    _counts(drops.get("alerts", {})),
                    None if complete is None else bool(complete),
                )
            )
        return out

    def run(self, name: str | None = None) -> RunInfo:
        """One run by name; the only run when ``name`` is None."""
        runs = self.runs()
        if name is None:
            if len(runs) == 1:
                return runs[0]
            if not runs:
                raise StoreError(f"run store {str(self.path)!r} holds no run")
            raise StoreError(
                f"run store {str(self.path)!r} holds {len(runs)} runs; name one with --run:"
                f" {_run_list(runs)}"
            )
        for info in runs:
            if info.run == name:
                return info
        held = f"it holds {_run_list(runs)}" if runs else "it holds no run"
        raise StoreError(f"run {name!r} is not in {str(self.path)!r}; {held}")

    @_decoded
    def windows(self, run: str | None = None) -> list[Window]:
        name = self.run(run).run
        rows = self._query(
            "SELECT step, first_step, last_step, sampled_steps FROM windows WHERE run = ?"
            " ORDER BY step",
            (name,),
        )
        return [Window(*(int(v) for v in row)) for row in rows]

    @_decoded
    def metrics(
        self, metric: str | None = None, layer: str | None = None, run: str | None = None
    ) -> list[tuple[int, str, str, float]]:
        """Rows (step, layer, metric, value), by step; ``layer=''`` selects run-level metrics."""
        name = self.run(run).run
        sql = "SELECT step, layer, metric, value FROM metrics WHERE run = ?"
        args: list[object] = [name]
        if metric is not None:
            sql += " AND metric = ?"
            args.append(metric)
        if layer is not None:
            sql += " AND layer = ?"
            args.append(layer)
        rows = self._query(sql + " ORDER BY step, layer, metric", tuple(args))
        return [
            (int(s), str(la), str(m), math.nan if v is None else float(v)) for s, la, m, v in rows
        ]

    def series(
        self, metric: str, layer: str = "", run: str | None = None
    ) -> list[tuple[int, float]]:
        """(step, value) of one metric of one layer (``''``: run-level) across windows."""
        return [(s, v) for s, _, _, v in self.metrics(metric, layer, run)]

    @_decoded
    def alerts(self, run: str | None = None) -> list[StoredAlert]:
        """Every alert event of the run, firing and resolved, in order."""
        name = self.run(run).run
        rows = self._query(
            "SELECT step, rule, layer, severity, state, metric, value, op, threshold, first_seen,"
            " summary, runbook FROM alerts WHERE run = ? ORDER BY rowid",
            (name,),
        )
        return [_alert_from_row(row) for row in rows]

    @_decoded
    def histograms(
        self, layer: str, run: str | None = None
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(step, edges, counts) of one layer's histogram across windows (full-length counts)."""
        name = self.run(run).run
        edge_rows = self._query(
            "SELECT edges FROM histogram_edges WHERE run = ? AND layer = ?", (name, layer)
        )
        if not edge_rows:
            return []
        edges = np.frombuffer(edge_rows[0][0], dtype=np.float64)
        out = []
        for step, first, blob in self._query(
            "SELECT step, first_bin, counts FROM histograms WHERE run = ? AND layer = ?"
            " ORDER BY step",
            (name, layer),
        ):
            part = np.frombuffer(blob, dtype=np.float64)
            counts = np.zeros(len(edges) - 1)
            counts[int(first) : int(first) + len(part)] = part  # ValueError if corrupt
            out.append((int(step), edges, counts))
        return out


def _counts(value: object) -> dict[str, int]:
    """``{sink: count}`` from the store's JSON (ValueError when it is anything else)."""
    if not isinstance(value, dict):
        raise ValueError(f"dropped counts are {type(value).__name__}, not an object")
    return {str(k): int(v) for k, v in value.items()}


def _short(name: object, limit: int = 40) -> str:
    """A name from the file, quoted and cut short (a crafted name can be huge)."""
    text = repr(str(name))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _run_list(runs: list[RunInfo], most: int = 20) -> str:
    """The runs' names, quoted, in the order they started (the first ``most``, then a count)."""
    names = ", ".join(_short(info.run) for info in runs[:most])
    return names + (f" and {len(runs) - most} more" if len(runs) > most else "")


def _alert_from_row(row: Any) -> StoredAlert:
    return StoredAlert(
        int(row[0]),
        str(row[1]),
        row[2],
        str(row[3]),
        str(row[4]),
        str(row[5]),
        math.nan if row[6] is None else float(row[6]),
        str(row[7]),
        float(row[8]),
        int(row[9]),
        str(row[10]),
        str(row[11]),
    )


@dataclass(frozen=True)
class FirstNonFinite:
    """The run's first NaN/Inf, as its ``nonfinite`` alert events tell it."""

    step: int  # the step of the first non-finite value
    layer: str | None  # the first offending layer in forward order, once named
    confirmed_step: int | None  # the step whose sampled statistics named the layer


def first_nonfinite(alerts: list[StoredAlert]) -> FirstNonFinite | None:
    """From a run's alert events: the ``nonfinite`` alert fires at the first NaN/Inf (with its
    layer when that step was sampled), and is re-issued naming the layer when sampling every
    step finds it later; ``first_seen`` is the first non-finite step in both."""
    first: FirstNonFinite | None = None
    for alert in alerts:
        if alert.rule != "nonfinite" or alert.state != "firing":
            continue
        if first is None or alert.first_seen < first.step:
            confirmed = alert.step if alert.layer is not None else None
            first = FirstNonFinite(alert.first_seen, alert.layer, confirmed)
        elif alert.first_seen == first.step and first.layer is None and alert.layer is not None:
            first = FirstNonFinite(first.step, alert.layer, alert.step)
    return first


def open(path: str | os.PathLike[str]) -> RunStore:
    """Open a run store for reading (``actmon.store.open("runs/x/actmon.db")``)."""
    return RunStore(path)
