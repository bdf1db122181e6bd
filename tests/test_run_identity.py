"""Run identity: a run never writes over or into another run's data. Names are claimed in the
store (name, name-2, ...) atomically, so two monitors in one process, two processes started
together and a reused name each get their own run; where each run went is logged."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rich.console import Console
from torch import nn

import actmon
from actmon import store
from actmon.demo import run_demo
from tests.helpers import train_steps

ROOT = Path(__file__).resolve().parents[1]  # the worker imports tests.helpers


def _model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(6, width), nn.ReLU())


def _check_run(db, run: str, windows: int, loss: float, layers: list[str]) -> None:
    """``run`` holds exactly its own windows, losses and layers, each metric row once."""
    info = db.run(run)
    assert info.status == "finished"
    assert [w.step for w in db.windows(run)] == list(range(1, windows + 1))
    assert db.series("loss", run=run) == [(s, loss) for s in range(1, windows + 1)]
    assert [layer["name"] for layer in info.layers] == layers
    rows = db.metrics(run=run)
    keys = [(s, la, m) for s, la, m, _ in rows]
    assert len(keys) == len(set(keys)), "a metric row written twice"


def test_two_monitors_in_one_process_started_together_get_their_own_runs(tmp_path, caplog):
    """A GAN: two models, two monitors started in the same second (default names), one store
    file: two runs of 10 windows each, each with its own losses and layer list."""
    path = tmp_path / "gan.db"
    gen, disc = _model(4), nn.Sequential(_model(3), nn.Linear(3, 1))
    sinks = {"store": {"path": str(path)}}
    with caplog.at_level(logging.INFO, logger="actmon"):
        a = actmon.watch(gen, log_every=1, sinks=sinks)
        b = actmon.watch(disc, log_every=1, sinks=sinks)
    assert a.run != b.run
    assert re.fullmatch(r"actmon-\d{8}-\d{6}-\d{3}(-\d+)?", a.run), a.run
    for _ in range(10):  # interleaved, as a GAN trains them
        train_steps(a, gen, 1, loss=1.0)
        train_steps(b, disc, 1, loss=2.0)
    a.close()
    b.close()
    assert a.delivered_windows == b.delivered_windows == {"store": 10}
    with store.open(path) as db:
        assert sorted(info.run for info in db.runs()) == sorted([a.run, b.run])
        _check_run(db, a.run, 10, 1.0, ["0", "1"])
        _check_run(db, b.run, 10, 2.0, ["0.0", "0.1", "1"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("actmon: run ")]
    assert lines == [f"actmon: run {a.run}, store {path}", f"actmon: run {b.run}, store {path}"]


def test_the_same_name_twice_in_one_process_gets_a_suffix(tmp_path, caplog):
    """Same explicit run_name, default store template (runs/{run}/actmon.db): the second
    monitor claims gan-2, in its own file; the INFO line says the name was taken."""
    gen, disc = _model(4), _model(5)
    with (
        caplog.at_level(logging.INFO, logger="actmon"),
        actmon.watch(gen, run_name="gan", log_every=1) as a,
        actmon.watch(disc, run_name="gan", log_every=1) as b,
    ):
        for _ in range(10):
            train_steps(a, gen, 1, loss=1.0)
            train_steps(b, disc, 1, loss=2.0)
    assert (a.run, b.run) == ("gan", "gan-2")
    with store.open("runs/gan/actmon.db") as db:
        _check_run(db, "gan", 10, 1.0, ["0", "1"])
    with store.open("runs/gan-2/actmon.db") as db:
        _check_run(db, "gan-2", 10, 2.0, ["0", "1"])
    assert "actmon: run gan-2 ('gan' was taken), store runs/gan-2/actmon.db" in caplog.messages


def test_a_reused_run_name_keeps_the_earlier_run(tmp_path):
    """Before: a re-run with the same name deleted the earlier run's rows. Now it is gan-2."""
    path = tmp_path / "r.db"
    model = _model(4)
    with actmon.watch(
        model, run_name="exp", log_every=1, sinks={"store": {"path": str(path)}}
    ) as m:
        train_steps(m, model, 4, loss=1.0)
    with actmon.watch(
        model, run_name="exp", log_every=1, sinks={"store": {"path": str(path)}}
    ) as m:
        train_steps(m, model, 6, loss=3.0)
    assert m.run == "exp-2"
    with store.open(path) as db:
        _check_run(db, "exp", 4, 1.0, ["0", "1"])
        _check_run(db, "exp-2", 6, 3.0, ["0", "1"])


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from torch import nn
    import actmon
    from tests.helpers import train_steps
    path, go, loss, name = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] or None
    model = nn.Sequential(nn.Linear(6, int(loss) + 2), nn.ReLU())
    while not os.path.exists(go):  # both processes start watch() at the same moment
        time.sleep(0.0005)
    monitor = actmon.watch(model, run_name=name, log_every=1, sinks={"store": {"path": path}})
    train_steps(monitor, model, 20, loss=loss)
    monitor.close()
    print(json.dumps([monitor.run, monitor.delivered_windows, monitor.errors]))
""")


def _race(tmp_path, name: str) -> list[list]:
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    path, go = tmp_path / f"shared-{name or 'default'}.db", tmp_path / f"go-{name}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), str(go), str(loss), name],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"},
        )
        for loss in (1.0, 2.0)
    ]
    time.sleep(3.0)  # both have imported torch and wait for the signal
    go.touch()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(json.loads(out.splitlines()[-1]))
    with store.open(path) as db:
        assert sorted(info.run for info in db.runs()) == sorted(r[0] for r in results)
        for (run, delivered, errors), loss in zip(results, (1.0, 2.0), strict=True):
            assert (delivered, errors) == ({"store": 20}, {})
            _check_run(db, run, 20, loss, ["0", "1"])
            width = int(loss) + 2  # each run holds its own model's layers
            assert [layer["units"] for layer in db.run(run).layers] == [width, width]
    return results


def test_two_processes_with_the_same_name_at_once_get_their_own_runs(tmp_path):
    """Before: one process's 20 windows vanished while both said delivered {'store': 20}."""
    runs = sorted(r[0] for r in _race(tmp_path, "same"))
    assert runs == ["same", "same-2"]


def test_two_processes_with_default_names_at_once_get_their_own_runs(tmp_path):
    runs = [r[0] for r in _race(tmp_path, "")]
    assert len(set(runs)) == 2


def test_a_demo_re_run_keeps_the_earlier_run(tmp_path):
    for _ in range(2):
        run_demo(
            steps=20,
            console=Console(file=io.StringIO()),
            out=str(tmp_path),
            scenario="healthy",
            report=False,
        )
    for run in ("demo-healthy", "demo-healthy-2"):
        with store.open(tmp_path / run / "actmon.db") as db:
            assert (db.run().run, db.run().status) == (run, "finished")
            assert len(db.windows()) > 0
        assert (tmp_path / run / "tensorboard").is_dir()
