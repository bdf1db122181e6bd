"""SIGTERM and interpreter exit without close(): the partial window is flushed, the sinks are
drained within ``sinks.drain_timeout_seconds`` and the run is marked ``terminated`` /
``finished``; SIGTERM then goes on to the handler installed before (or kills the process as the
default would). Real signals, in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from torch import nn

import actmon
from actmon import store
from actmon.errors import ConfigError
from tests.helpers import train_steps, wait_for

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from torch import nn
    import actmon
    from tests.helpers import train_steps
    path = sys.argv[1]
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
""")


def _start(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == text:
            return
    raise AssertionError(f"no line {text!r}; stderr: {proc.stderr.read() if proc.stderr else ''}")


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _stored(tmp_path: Path) -> tuple[str, list[int], list[tuple[int, float]]]:
    with store.open(tmp_path / "run.db") as db:
        return db.run().status, [w.step for w in db.windows()], db.series("loss")


def test_sigterm_inside_a_with_block_flushes_the_partial_window_and_marks_the_run(tmp_path):
    proc = _start(
        tmp_path,
        """
        with actmon.watch(model, run_name="t", log_every=10, sinks={"store": {"path": path}}) as m:
            train_steps(m, model, 25, loss=2.0)
            print("ready", flush=True)
            time.sleep(60)  # a scheduler's SIGTERM arrives here
        print("not reached", flush=True)
        """,
    )
    _wait_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == -signal.SIGTERM, err  # the default action still happens, after the drain
    assert "not reached" not in out
    assert _stored(tmp_path) == ("terminated", [10, 20, 25], [(10, 2.0), (20, 2.0), (25, 2.0)])


def test_sigterm_goes_on_to_the_handler_installed_before(tmp_path):
    proc = _start(
        tmp_path,
        """
        def handler(signum, frame):
            print("user handler ran", flush=True)
            sys.exit(7)

        signal.signal(signal.SIGTERM, handler)
        m = actmon.watch(model, run_name="t", log_every=10, sinks={"store": {"path": path}})
        train_steps(m, model, 14, loss=1.0)
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    _wait_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert (rc, out) == (7, "user handler ran\n"), err
    assert _stored(tmp_path) == ("terminated", [10, 14], [(10, 1.0), (14, 1.0)])


def test_sigterm_during_a_step_ends_the_run_once_the_step_is_done(tmp_path):
    """The signal arrives inside step() (the loss's __float__ sends it): the step completes,
    is counted in the partial window, and then the run ends."""
    proc = _start(
        tmp_path,
        """
        class Killer(float):
            def __float__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                return 3.0

        m = actmon.watch(model, run_name="t", log_every=10, sinks={"store": {"path": path}})
        train_steps(m, model, 12, loss=1.0)
        m.step(loss=Killer(3.0))
        print("not reached", flush=True)
        """,
    )
    rc, out, err = _finish(proc)
    assert (rc, out) == (-signal.SIGTERM, ""), err
    status, steps, losses = _stored(tmp_path)
    assert (status, steps) == ("terminated", [10, 13])
    assert losses[1] == (13, pytest.approx((1.0 + 1.0 + 3.0) / 3))


def test_exit_without_close_delivers_every_queued_window(tmp_path):
    """Before: 37 of 200 windows still queued for the store were lost at exit."""
    proc = _start(
        tmp_path,
        """
        model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(40)])
        m = actmon.watch(model, run_name="t", log_every=1, sample_every=1,
                         sinks={"store": {"path": path}, "queue_size": 256})
        train_steps(m, model, 200, loss=1.0)
        print(f"queued at exit: {200 - m.delivered_windows['store']}", flush=True)
        """,  # no close(): the interpreter exits
    )
    rc, out, err = _finish(proc)
    assert rc == 0, err
    print(out.strip())  # the figure: how many windows were still queued when the script ended
    status, steps, _ = _stored(tmp_path)
    assert (status, steps) == ("finished", list(range(1, 201)))


def test_an_uncaught_exception_without_close_marks_the_run_failed(tmp_path):
    proc = _start(
        tmp_path,
        """
        m = actmon.watch(model, run_name="t", log_every=4, sinks={"store": {"path": path}})
        train_steps(m, model, 6, loss=1.0)
        raise RuntimeError("boom")
        """,
    )
    rc, _, err = _finish(proc)
    assert rc == 1
    assert "RuntimeError: boom" in err
    assert _stored(tmp_path)[:2] == ("failed", [4, 6])


def test_close_puts_the_earlier_sigterm_handler_back():
    def mine(signum, frame):  # pragma: no cover - never called
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
        first = actmon.watch(model, sinks={"store": {"enabled": False}})
        second = actmon.watch(nn.Linear(6, 2), sinks={"store": {"enabled": False}})
        assert signal.getsignal(signal.SIGTERM) is actmon.lifecycle._on_sigterm
        first.close()
        assert signal.getsignal(signal.SIGTERM) is not mine  # the second is still open
        second.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_handler_that_puts_ours_back_keeps_the_chain_to_the_one_before(tmp_path):
    """Lightning's signal connector installs its SIGTERM handler over ours for fit and puts
    ours back after: a monitor closed in between leaves ours chaining to the original."""
    proc = _start(
        tmp_path,
        """
        def original(signum, frame):
            print("original handler", flush=True)
            sys.exit(7)

        def theirs(signum, frame):
            print("not reached", flush=True)

        signal.signal(signal.SIGTERM, original)
        first = actmon.watch(nn.Linear(6, 2), sinks={"store": {"enabled": False}})
        ours = signal.signal(signal.SIGTERM, theirs)  # "fit" starts
        first.close()  # closed during fit: theirs is on top, so it stays
        assert signal.getsignal(signal.SIGTERM) is theirs
        signal.signal(signal.SIGTERM, ours)  # "fit" ends: ours is back
        m = actmon.watch(model, run_name="t", log_every=4, sinks={"store": {"path": path}})
        train_steps(m, model, 6, loss=1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        """,
    )
    rc, out, err = _finish(proc)
    assert (rc, out) == (7, "original handler\n"), err
    assert _stored(tmp_path)[:2] == ("terminated", [4, 6])


def test_an_ignored_sigterm_stays_ignored_and_a_thread_installs_nothing():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with actmon.watch(nn.Linear(6, 2), sinks={"store": {"enabled": False}}):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    seen = []

    def in_thread() -> None:  # signal.signal() would raise ValueError off the main thread
        with actmon.watch(nn.Linear(6, 2), sinks={"store": {"enabled": False}}):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [before]


class Blocking:
    def __init__(self) -> None:
        self.release = threading.Event()

    def write(self, snapshot: actmon.Snapshot) -> None:
        self.release.wait()

    def close(self) -> None:
        pass


def test_a_stuck_sink_cannot_hold_close_beyond_the_drain_timeout(tmp_path):
    stuck = Blocking()
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    sinks = {"store": {"path": str(tmp_path / "r.db")}, "drain_timeout_seconds": 0.5}
    monitor = actmon.watch(model, log_every=1, extra_sinks=[stuck], sinks=sinks)
    train_steps(monitor, model, 5, loss=1.0)
    start = time.monotonic()
    monitor.close()
    took = time.monotonic() - start
    stuck.release.set()
    assert took < 0.5 + 2.0 + 0.5  # the deadline, then the sinks' close grace
    assert monitor.dropped_windows == {"store": 0, "Blocking": 4}  # 1 stuck in write, 4 left
    wait_for(
        lambda: not any(t.name == "actmon-sink-Blocking" for t in threading.enumerate()),
        what="the stuck sink's thread ends once released",
    )
    with store.open(tmp_path / "r.db") as db:
        assert (db.run().status, len(db.windows())) == ("finished", 5)


def test_drain_timeout_is_validated():
    with pytest.raises(ConfigError, match="drain_timeout_seconds"):
        actmon.watch(nn.Linear(2, 2), sinks={"drain_timeout_seconds": 0})
