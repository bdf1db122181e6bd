"""The run store sink: writes each window into the run's SQLite file (see ``actmon.store``).

It runs on its SinkRunner's thread, so the connection is opened there, at the first write.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actmon.rules import Alert
from actmon.snapshot import LayerInfo, Snapshot
from actmon.store import SCHEMA, SCHEMA_VERSION


class StoreSink:
    """Appends windows to ``path``; marks the run finished/failed at close."""

    def __init__(
        self,
        path: str | Path,
        run: str,
        config_json: str,
        layers: Callable[[], list[LayerInfo]],
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.run = run
        self.status = "finished"  # what close() records; the monitor sets "failed"
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
            db = sqlite3.connect(self.path, timeout=self._busy_timeout)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                for table in (
                    "layers",
                    "windows",
                    "metrics",
                    "histograms",
                    "histogram_edges",
                    "alerts",
                ):  # a re-run with the same name replaces the old one
                    db.execute(f"DELETE FROM {table} WHERE run = ?", (self.run,))
                db.execute(
                    "INSERT OR REPLACE INTO runs VALUES (?, ?, NULL, 'running', ?, '[]')",
                    (self.run, self._started, self._config_json),
                )
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
        self._edges_stored.update(k for _, k, _ in new_edges)  # only once committed

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
        with db:
            self._write_layers(db)
            db.execute(
                "UPDATE runs SET ended = ?, status = ? WHERE run = ?",
                (time.time(), self.status, self.run),
            )
        db.close()
        self._db = None
