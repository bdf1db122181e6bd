"""The SQLite run store: written off-thread, read back equal, survives SIGKILL, clear errors."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from torch import nn

import actmon
from actmon import store
from actmon.store import StoreError
from tests.helpers import train_steps


def _train(monitor, model, steps):
    train_steps(monitor, model, steps, loss=1.5)


def test_store_holds_every_window_equal_to_the_snapshots(tmp_path):
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    path = tmp_path / "run.db"
    with actmon.watch(
        model, run_name="r1", log_every=4, sample_every=1, sinks={"store": {"path": str(path)}}
    ) as monitor:
        _train(monitor, model, 12)
    snaps = list(monitor.history)
    with store.open(path) as db:
        info = db.run()
        assert (info.run, info.status) == ("r1", "finished")
        assert info.ended is not None
        assert info.config["log_every"] == 4
        assert [layer["name"] for layer in info.layers] == ["0", "1", "2"]
        assert [w.step for w in db.windows()] == [4, 8, 12]
        for snap in snaps:
            relu = snap.layers["1"]
            stored = {m: v for s, la, m, v in db.metrics(layer="1") if s == snap.step}
            for name, value in relu.metrics().items():
                assert stored[name] == pytest.approx(value, rel=1e-12), name
        assert db.series("loss") == [(4, 1.5), (8, 1.5), (12, 1.5)]
        step, edges, counts = db.histograms("0")[-1]
        assert step == 12
        np.testing.assert_array_equal(edges, snaps[-1].layers["0"].hist_edges)
        np.testing.assert_array_equal(counts, snaps[-1].layers["0"].hist_counts)


def test_a_failed_run_is_marked_failed(tmp_path):
    model = nn.Sequential(nn.Linear(6, 2))
    path = tmp_path / "run.db"

    def run() -> None:
        with actmon.watch(
            model, run_name="bad", log_every=2, sinks={"store": {"path": str(path)}}
        ) as monitor:
            _train(monitor, model, 3)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run()
    with store.open(path) as db:
        assert db.run().status == "failed"
        assert [w.step for w in db.windows()] == [2, 3]


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    import actmon
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = actmon.watch(model, optimizer=opt, run_name="killed", log_every=2,
                           sample_every=1, sinks={"store": {"path": sys.argv[1]}})
    windows = 0
    while True:
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step(); opt.zero_grad()
        if monitor.step(loss=torch.tensor(1.0)) is not None:
            windows += 1
            while monitor.delivered_windows["store"] < windows:
                time.sleep(0.001)
            print(f"delivered {windows}", flush=True)
""")


def test_sigkill_at_random_points_twenty_times_leaves_readable_stores(tmp_path):
    """20 runs killed with SIGKILL at random points (some mid-write): every store opens, holds
    every window delivered before the kill, and the gate and the report work on it."""
    from click.testing import CliRunner

    from actmon.cli import main
    from actmon.report import write_report

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    rng = random.Random(20)
    for i in range(20):
        kill_after, extra = rng.randint(1, 5), rng.uniform(0, 0.05)
        path = tmp_path / f"killed-{i}.db"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == f"delivered {kill_after}":
                break
        time.sleep(extra)  # sometimes during the next window's write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with store.open(path) as db:
            assert db.run().status == "running"  # never closed
            steps = [w.step for w in db.windows()]
            assert steps[:kill_after] == [2 * (k + 1) for k in range(kill_after)]
            assert {s for s, *_ in db.metrics("mean", "1")} >= set(steps[:kill_after])
        gate = CliRunner().invoke(main, ["gate", "--store", str(path)])
        assert gate.exit_code in (0, 1), gate.output
        assert write_report(path, tmp_path / f"report-{i}.html").stat().st_size > 0


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        store.open(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="is not a readable actmon run store"):
        store.open(junk)
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.executescript(store.SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="has schema version 99; this actmon reads versions 1, 2"):
        store.open(other)
