"""The run store sink: writes each window into the run's SQLite file (see ``actmon.store``).

A run's name is claimed in its store at ``watch()`` (:func:`claim_run`), so no run ever writes
over or into another one's rows. The sink runs on its SinkRunner's thread, so its connection
is opened there, at the first write.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actmon.rules import Alert
from actmon.sinks.paths import rank_path
from actmon.snapshot import LayerInfo, Snapshot
from actmon.store import SCHEMA, SCHEMA_VERSION, StoreError

log = logging.getLogger("actmon")

_MAX_CLAIMS = 10_000  # name, name-2, ... name-10000: beyond that something else is wrong


def claim_run(
    template: str,
    base: str,
    rank: int | None,
    config_json: str,
    busy_timeout: float = 5.0,
    available: Callable[[str], bool] = lambda name: True,
    exact: bool = False,
) -> tuple[str, Path]:
    """Claim a run name in its store: ``base``, else ``base-2``, ``base-3``, ... (the first one
    no run in its store file holds and ``available`` accepts). Returns the name and the path.

    Each claim is one ``BEGIN IMMEDIATE`` transaction (check, then insert the ``running`` row),
    so two monitors in one process or two processes racing for a name get distinct ones.
    ``exact``: only ``base`` will do (a rank joining rank 0's run); StoreError when taken.
    """
    started = time.time()
    for n in range(1, _MAX_CLAIMS + 1):
        name = base if n == 1 else f"{base}-{n}"
        if not available(name):
            continue
        path = Path(rank_path(template, name, rank, directory=False))
        if _claim(path, name, started, config_json, busy_timeout):
            return name, path
        if exact:
            raise StoreError(f"run {name!r} is already in {str(path)!r}; it is left as it is")
    raise StoreError(f"run names {base!r} to {base!r}-{_MAX_CLAIMS} are all taken")


def _claim(path: Path, run: str, started: float, config_json: str, busy_timeout: float) -> bool:
    """Insert ``run``'s ``running`` row unless the store already holds that run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _prepare(db)
        db.execute("BEGIN IMMEDIATE")  # the write lock first: check and insert are one step
        try:
            if db.execute("SELECT 1 FROM runs WHERE run = ?", (run,)).fetchone() is not None:
                return False
            db.execute(
                "INSERT INTO runs (run, started, ended, status, config_json, model_json,"
                " complete) VALUES (?, ?, NULL, 'running', ?, '[]', 0)",
                (run, started, config_json),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return True
    finally:
        db.close()


def _prepare(db: sqlite3.Connection) -> None:
    """WAL mode and the schema, created in one transaction (processes may race to create it).

    ``db`` is in autocommit mode (``isolation_level=None``)."""
    for attempt in range(50):  # switching to WAL can answer "locked" without waiting
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.02)
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif str(row[0]) == "1":  # its runs keep complete = NULL: not known
            db.execute("ALTER TABLE runs ADD COLUMN dropped_json TEXT NOT NULL DEFAULT '{}'")
            db.execute("ALTER TABLE runs ADD COLUMN complete INTEGER")
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
        elif str(row[0]) != str(SCHEMA_VERSION):
            raise StoreError(
                f"the run store has schema version {row[0]}; this actmon writes version"
                f" {SCHEMA_VERSION}: give the run another store path"
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


Drops = Callable[[], tuple[dict[str, int], dict[str, int]]]


class StoreSink:
    """Appends windows to ``path``; records how the run ended at close: its status, what every
    sink dropped (``dropped()``: windows and alerts by sink) and whether it is complete."""

    def __init__(
        self,
        path: str | Path,
        run: str,
        config_json: str,
        layers: Callable[[], list[LayerInfo]],
        busy_timeout: float = 5.0,
        dropped: Drops = lambda: ({}, {}),
    ) -> None:
        self.path = Path(path)
        self.run = run
        self.status = "finished"  # what close() records; the monitor sets "failed"
        self._dropped = dropped
        self._dropped_stored = "{}"
        self._config_json = config_json
        self._layers = layers
        self._db: sqlite3.Connection | None = None
        self._started = time.time()
        self._layers_written = 0
        self._busy_timeout = busy_timeout
        self._edges_written: dict[str, bytes] = {}  # layer -> edges (fixed for a run)
        self._edges_stored: set[str] = set()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                _prepare(db)  # the file may have been removed since the claim
                # The run was claimed at watch(); only a store recreated since lacks its row.
                db.execute(
                    "INSERT OR IGNORE INTO runs (run, started, ended, status, config_json,"
                    " model_json, complete) VALUES (?, ?, NULL, 'running', ?, '[]', 0)",
                    (self.run, self._started, self._config_json),
                )
            except BaseException:
                db.close()
                raise
            db.isolation_level = "DEFERRED"  # from here on, `with db:` is one transaction
            self._db = db
        return self._db

    def _write_layers(self, db: sqlite3.Connection) -> None:
        layers = self._layers()
        known = sum(1 for info in layers if info.units is not None)
        if known == self._layers_written:
            return
        db.executemany(
            "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?)",
            [(self.run, i.name, i.kind.value, i.unit_axis, i.units) for i in layers],
        )
        model = [
            {
                "name": i.name,
                "kind": i.kind.value,
                "unit_axis": i.unit_axis,
                "units": i.units,
                "params": list(i.params),
            }
            for i in layers
        ]
        db.execute("UPDATE runs SET model_json = ? WHERE run = ?", (json.dumps(model), self.run))
        self._layers_written = known

    def write(self, snapshot: Snapshot) -> None:
        db = self._connect()
        step = snapshot.step
        rows = [(self.run, step, "", name, value) for name, value in snapshot.run_metrics().items()]
        fresh = snapshot.fresh_layers().values()  # carried layers were written in their window
        for layer in fresh:
            rows.extend(
                (self.run, step, layer.name, name, value) for name, value in layer.metrics().items()
            )
        hists = []
        for layer in fresh:
            counts = np.asarray(layer.hist_counts, np.float64)
            used = np.nonzero(counts)[0]
            first, last = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
            hists.append((self.run, step, layer.name, first, counts[first:last].tobytes()))
            if layer.name not in self._edges_written:
                self._edges_written[layer.name] = np.asarray(layer.hist_edges, np.float64).tobytes()
        with db:  # one transaction per window: all of it or none of it survives a kill
            self._write_layers(db)
            db.execute(
                "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?)",
                (
                    self.run,
                    step,
                    snapshot.window[0],
                    snapshot.window[1],
                    len(snapshot.sampled_steps),
                ),
            )
            db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                [(r, s, la, m, None if v != v else v) for r, s, la, m, v in rows],
            )
            db.executemany("INSERT INTO histograms VALUES (?, ?, ?, ?, ?)", hists)
            new_edges = [
                (self.run, k, v)
                for k, v in self._edges_written.items()
                if k not in self._edges_stored
            ]
            db.executemany("INSERT OR REPLACE INTO histogram_edges VALUES (?, ?, ?)", new_edges)
            drops = self._drops_json()
            if drops != self._dropped_stored:  # so a killed run's store says it lost some
                db.execute("UPDATE runs SET dropped_json = ? WHERE run = ?", (drops, self.run))
        self._edges_stored.update(k for _, k, _ in new_edges)  # only once committed
        self._dropped_stored = drops

    def _drops_json(self) -> str:
        windows, alerts = self._dropped()
        return json.dumps({"windows": windows, "alerts": alerts}, sort_keys=True)

    def write_alert(self, alert: Alert) -> None:
        db = self._connect()
        with db:
            db.execute(
                "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.run,
                    alert.step,
                    alert.rule,
                    alert.layer,
                    alert.severity,
                    alert.state,
                    alert.metric,
                    alert.value if alert.value == alert.value else None,
                    alert.op,
                    alert.threshold,
                    alert.first_seen,
                    alert.summary,
                    alert.runbook,
                ),
            )

    def close(self) -> None:
        db = self._connect()
        try:
            try:
                self._finish(db, layers=True)
            except sqlite3.OperationalError:
                # A full disk: after a checkpoint the short final update may still fit (the
                # WAL's frames are reused), and the run then says how it ended and what it lost.
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._finish(db, layers=False)
        finally:
            db.close()
            self._db = None

    def _finish(self, db: sqlite3.Connection, layers: bool) -> None:
        """The run's last row update: ended, status, drops, and whether it is complete."""
        windows, alerts = self._dropped()  # final: the other sinks are closed before this one
        complete = (
            self.status == "finished" and not any(windows.values()) and not any(alerts.values())
        )
        with db:
            if layers:
                self._write_layers(db)
            db.execute(
                "UPDATE runs SET ended = ?, status = ?, dropped_json = ?, complete = ?"
                " WHERE run = ?",
                (
                    time.time(),
                    self.status,
                    json.dumps({"windows": windows, "alerts": alerts}, sort_keys=True),
                    int(complete),
                    self.run,
                ),
            )
