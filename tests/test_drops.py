"""Drops never look like success: alerts are never dropped behind windows; every sink's drops are
counted (``monitor.dropped_windows``, ``monitor.errors``), exported
(``actmon_dropped_windows_total{sink}``) and recorded in the run store, whose run is then
incomplete. Drops here are real: a sink kept busy, a file size limit (a full disk), a lock."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import torch
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import actmon
from actmon import store
from actmon.cli import main
from tests.helpers import fetch_when, train_steps, wait_for

ROOT = Path(__file__).resolve().parents[1]
EVERY_LAYER = {"name": "any", "metric": "zero_fraction", "op": ">=", "threshold": 0}


class Held:
    """A sink that records what it is given, in order, and holds its first call until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.got: list[tuple[str, int]] = []

    def _hold(self) -> None:
        self.entered.set()
        self.release.wait()

    def write(self, snapshot: actmon.Snapshot) -> None:
        self._hold()
        self.got.append(("window", snapshot.step))

    def write_alert(self, alert: actmon.Alert) -> None:
        self._hold()
        self.got.append(("alert", alert.step))

    def close(self) -> None:
        pass


def test_alerts_are_never_dropped_behind_windows(tmp_path):
    """300 alerts at one step while a sink is behind by 9 windows (queue of 2): before, they
    shared the 64-slot window queue and 236 of them were dropped (and counted as windows)."""
    model = nn.Sequential(*[nn.ReLU() for _ in range(300)])
    held = Held()
    path = tmp_path / "r.db"
    sinks = {"store": {"path": str(path)}, "queue_size": 2}
    monitor = actmon.watch(
        model, log_every=1, rules=[EVERY_LAYER], checks=False, extra_sinks=[held], sinks=sinks
    )
    try:
        monitor.step()  # window 1, before any layer ran: no alert; the sink holds it
        assert held.entered.wait(10)
        for window in range(2, 11):  # window 2: 300 alerts fire; then windows 3-10
            model(torch.randn(4, 8))
            monitor.step()
            wait_for(lambda w=window: monitor.delivered_windows["store"] == w, what="a window")
        assert monitor.dropped_windows == {"store": 0, "Held": 7}  # 1 held, 2 queued, 7 dropped
    finally:
        held.release.set()
        monitor.close()
    assert monitor.dropped_alerts == {"store": 0, "Held": 0}
    assert held.got == [("window", 1)] + [("alert", 2)] * 300 + [("window", 2), ("window", 3)]
    assert monitor.errors == {"dropped:Held": 7}
    with store.open(path) as db:
        assert len(db.alerts()) == 300
        info = db.run()
        assert (info.dropped, info.dropped_alerts) == (
            {"store": 0, "Held": 7},
            {"store": 0, "Held": 0},
        )
        assert (info.status, info.complete) == ("finished", False)


def test_tensorboard_drops_are_counted_exported_and_recorded(tmp_path):
    """Before: TensorBoard dropped 3,184 of 5,000 windows with one warning, errors stayed {}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    path, logs = tmp_path / "r.db", tmp_path / "tb"
    sinks = {
        "store": {"path": str(path)},
        "tensorboard": {"enabled": True, "log_dir": str(logs)},
        "prometheus": {"enabled": True, "port": 0},
        "queue_size": 2,
    }
    monitor = actmon.watch(model, log_every=1, sinks=sinks)
    tensorboard = monitor.sinks["tensorboard"]
    real_write, entered, release = tensorboard.write, threading.Event(), threading.Event()

    def slow_write(snapshot: actmon.Snapshot) -> None:  # TensorBoard falling behind
        entered.set()
        release.wait()
        real_write(snapshot)

    tensorboard.write = slow_write  # type: ignore[method-assign]
    try:
        for window in range(1, 12):  # TensorBoard: 1 held, 2 and 3 wait, 4-11 are dropped
            train_steps(monitor, model, 1, loss=1.0)
            wait_for(lambda w=window: monitor.delivered_windows["store"] == w, what="a window")
            assert entered.wait(10)
        assert monitor.dropped_windows == {"store": 0, "tensorboard": 8, "prometheus": 0}
        assert monitor.errors == {"dropped:tensorboard": 8}
        text = fetch_when(monitor.prometheus_url, f'actmon_step{{run="{monitor.run}"}} 11.0')
        exported = {
            s.labels["sink"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "actmon_dropped_windows_total"
        }
        # As of window 11's flush: window 11 itself was dropped after it.
        assert exported == {"store": 0.0, "tensorboard": 7.0, "prometheus": 0.0}
    finally:
        release.set()
        monitor.close()
    acc = EventAccumulator(str(logs))
    acc.Reload()
    assert [e.step for e in acc.Scalars("actmon.run/loss")] == [1, 2, 3]  # 3 + 8 = 11 windows
    with store.open(path) as db:
        info = db.run()
        assert info.dropped == {"store": 0, "tensorboard": 8, "prometheus": 0}
        assert (info.status, info.complete) == ("finished", False)
        assert len(db.windows()) == 11
    gate = CliRunner().invoke(main, ["gate", "--store", str(path)])
    assert gate.exit_code == 1, gate.output
    assert (
        "FAIL the run is incomplete: 8 windows by the tensorboard sink were dropped" in gate.output
    )


FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    import torch
    from torch import nn
    import actmon
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(10)])
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
    sinks = {"store": {"path": sys.argv[1]}, "retries": 0, "queue_size": 200}
    m = actmon.watch(model, run_name="full", log_every=1, sample_every=1, sinks=sinks)
    for _ in range(120):
        model(torch.randn(4, 8)).sum().backward()
        m.step(loss=torch.tensor(1.0))
    m.close()
    print(json.dumps([m.delivered_windows, m.dropped_windows, m.dropped_alerts]))
""")


def test_a_full_disk_makes_an_incomplete_run_that_says_what_it_lost(tmp_path):
    """Store files limited to 1 MB (RLIMIT_FSIZE, as a small filesystem would): most windows
    cannot be written. Before, the store said `finished` and the gate judged the last window
    that fitted as the final one."""
    script, path = tmp_path / "full.py", tmp_path / "full.db"
    script.write_text(FULL_DISK)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, str(script), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    delivered, dropped, dropped_alerts = json.loads(out.stdout.splitlines()[-1])
    assert delivered["store"] + dropped["store"] == 120
    assert dropped["store"] > 60
    with store.open(path) as db:
        info = db.run()
        assert len(db.windows()) == delivered["store"]
        assert (info.status, info.complete) == ("finished", False)
        assert (info.dropped, info.dropped_alerts) == (dropped, dropped_alerts)
    # Before, the gate passed the run on the last window that fitted.
    gate = CliRunner().invoke(main, ["gate", "--store", str(path)])
    assert gate.exit_code == 1, gate.output
    assert f"{dropped['store']} windows by the store sink" in gate.output


def test_a_dropped_window_of_a_locked_store_is_recorded(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    path = tmp_path / "r.db"
    sinks = {"store": {"path": str(path), "busy_timeout_seconds": 0.05}, "retries": 0}
    with actmon.watch(model, log_every=2, sinks=sinks) as monitor:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holds the file
        train_steps(monitor, model, 2, loss=1.0)
        wait_for(lambda: monitor.dropped_windows["store"] == 1, what="window 2 dropped")
        other.execute("COMMIT")
        other.close()
        train_steps(monitor, model, 2, loss=1.0)
    with store.open(path) as db:
        info = db.run()
        assert [w.step for w in db.windows()] == [4]
        assert (info.dropped, info.complete) == ({"store": 1}, False)


V1_RUNS = """CREATE TABLE runs (
    run TEXT PRIMARY KEY, started REAL NOT NULL, ended REAL, status TEXT NOT NULL,
    config_json TEXT NOT NULL, model_json TEXT NOT NULL
);"""


def test_a_version_1_store_is_read_and_migrated(tmp_path):
    """Version 1 stores (no drops recorded) read with complete=None; writing a run into one
    migrates it to version 2, its old runs still "not known"."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    schema = store.SCHEMA
    start = schema.index("CREATE TABLE IF NOT EXISTS runs")
    db.executescript(schema[:start] + V1_RUNS + schema[schema.index(");", start) + 2 :])
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO runs VALUES ('old', 1.0, 2.0, 'finished', '{}', '[]')")
    db.commit()
    db.close()
    with store.open(path) as old:
        info = old.run()
        assert (info.run, info.status, info.dropped, info.complete) == ("old", "finished", {}, None)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    with actmon.watch(
        model, log_every=2, run_name="new", sinks={"store": {"path": str(path)}}
    ) as m:
        train_steps(m, model, 4, loss=1.0)
    with store.open(path) as new:
        assert new.version == 2
        assert [(i.run, i.complete) for i in new.runs()] == [("old", None), ("new", True)]
        assert new.run("new").dropped == {"store": 0}
