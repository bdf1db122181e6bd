"""The run store's reader under hostile input: file names that break a ``file:`` URI, a
crafted schema (a never-ending ``WITH RECURSIVE`` view in place of ``metrics``, triggers,
extra objects), queries that never end, deeply nested JSON."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

import actmon
from actmon import store
from actmon.cli import main
from actmon.store import StoreError
from tests.helpers import train_steps

# Each broke the reader's URI: "#" and "?" ended the path (another, empty file was created and
# read, mode=ro lost), "%41" was read as "A", "%zz" was an uncaught sqlite3.OperationalError.
NAMES = ["a#b.db", "q?x.db", "p%41.db", "p%zz.db", "sp ace ü名 🔥.db", "dir#1?/r%20&mode=rwc.db"]


def _write_run(path: Path, run: str = "r") -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with actmon.watch(
        model, run_name=run, log_every=2, sample_every=1, sinks={"store": {"path": str(path)}}
    ) as monitor:
        train_steps(monitor, model, 6, loss=1.0)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", NAMES)
def test_store_names_with_uri_characters_are_read_read_only(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    _write_run(path)
    before, digest = _files(tmp_path), hashlib.sha256(path.read_bytes()).hexdigest()
    with store.open(path) as db:
        assert (db.run().run, db.run().status) == ("r", "finished")
        assert [w.step for w in db.windows()] == [2, 4, 6]
        assert db.series("loss") == [(2, 1.0), (4, 1.0), (6, 1.0)]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db._db.execute("DELETE FROM metrics")  # mode=ro holds
    out = tmp_path / "report.html"
    report = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert report.exit_code == 0, report.output
    assert out.stat().st_size > 0
    gate = CliRunner().invoke(main, ["gate", "--store", str(path)])
    assert gate.exit_code == 0, gate.output
    # Nothing written: the store is unchanged and the only new files are the report and
    # SQLite's own WAL companions of the store (no stray "a", "q" or "p" files).
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    companions = {f"{name}-wal", f"{name}-shm", "report.html"}
    assert _files(tmp_path) - before <= companions


_RECURSIVE_METRICS = """
DROP TABLE metrics;
CREATE VIEW metrics AS
    WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)
    SELECT runs.run AS run, x AS step, '' AS layer, 'loss' AS metric, 1.0 AS value
    FROM c, runs;
"""


def _crafted(tmp_path: Path, sql: str) -> Path:
    path = tmp_path / "crafted.db"
    _write_run(path)
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.commit()
    db.close()
    return path


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        (_RECURSIVE_METRICS, "view 'metrics'"),
        (
            "CREATE TRIGGER t AFTER INSERT ON alerts BEGIN DELETE FROM runs; END;",
            "trigger 't'",
        ),
        ("CREATE TABLE extra (x);", "table 'extra'"),
        ("CREATE INDEX sneaky ON metrics (value);", "index 'sneaky'"),
        (
            "DROP TABLE windows; CREATE VIRTUAL TABLE windows USING fts5(run, step);",
            "table (virtual) 'windows'",
        ),
    ],
)
def test_a_store_with_a_crafted_schema_is_refused_fast(tmp_path, sql, found):
    path = _crafted(tmp_path, sql)
    start = time.monotonic()
    with pytest.raises(StoreError, match="is not an actmon run store") as info:
        store.open(path)
    assert time.monotonic() - start < 2
    assert found in str(info.value)
    assert "a run store holds only the tables alerts, histogram_edges, histograms" in str(
        info.value
    )


def test_report_and_gate_fail_fast_on_the_recursive_view(tmp_path):
    """Before: 14 CPU-minutes in the view until killed. Now: a clear error in seconds (each
    command in a subprocess with a timeout, so a regression fails instead of hanging)."""
    path = _crafted(tmp_path, _RECURSIVE_METRICS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for args, code in (
        (["report", str(path), "-o", str(tmp_path / "r.html")], 1),
        (["gate", "--store", str(path)], 2),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "actmon.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == code, result.stderr
        assert "its schema holds view 'metrics'" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_a_query_that_runs_too_long_is_stopped(tmp_path):
    """The progress handler bounds every query, whatever the schema check lets through."""
    path = tmp_path / "r.db"
    _write_run(path)
    with store.RunStore(path, query_seconds=0.3) as db:
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"a query ran over 0\.3 s and was stopped"):
            db._query(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
                " SELECT count(*) FROM c"
            )
        assert time.monotonic() - start < 2
        assert db.series("loss") == [(2, 1.0), (4, 1.0), (6, 1.0)]  # the store still reads


def test_deeply_nested_json_is_a_store_error(tmp_path):
    path = _crafted(tmp_path, "UPDATE runs SET model_json = '" + "[" * 100_000 + "';")
    with store.open(path) as db, pytest.raises(StoreError, match="holds a corrupt row"):
        db.runs()
