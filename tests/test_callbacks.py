"""Alert callbacks run on their own thread: a stuck one cannot stall training, a raising one is
counted, and alerts beyond the bounded queue are dropped and counted."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import torch
from torch import nn

import actmon
from actmon import callbacks
from actmon.rules import Alert
from tests.helpers import wait_for

NO_STORE = {"store": {"enabled": False}}


def _always(n: int) -> list[dict[str, object]]:
    """n rules that fire for the layer "0" in the first window (zero_fraction >= 0 holds)."""
    return [
        {
            "name": f"r{i}",
            "metric": "zero_fraction",
            "op": ">=",
            "threshold": 0.0,
            "layers": {"globs": ["0"]},
            "actions": ["callback"],
        }
        for i in range(n)
    ]


def _train(monitor: actmon.Monitor, model: nn.Module, steps: int) -> float:
    """Run ``steps`` training steps; the slowest step()'s seconds."""
    slowest = 0.0
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        start = time.perf_counter()
        monitor.step()
        slowest = max(slowest, time.perf_counter() - start)
    return slowest


def test_a_stuck_callback_does_not_stop_training():
    release, entered = threading.Event(), threading.Event()
    calls: list[Alert] = []

    def stuck(alert: Alert) -> None:
        calls.append(alert)
        entered.set()
        release.wait(60)  # a hung webhook; released at the end so the test leaves no thread

    model = nn.Sequential(nn.Linear(4, 3))
    monitor = actmon.watch(model, log_every=2, sample_every=1, rules=_always(3), sinks=NO_STORE)
    monitor.on_alert(stuck)
    try:
        slowest = _train(monitor, model, 20)
        assert monitor.step_count == 20  # training went on while the callback hung
        assert slowest < 1.0
        assert entered.wait(10)
        assert [a.rule for a in calls] == ["r0"]  # one call, still running
        assert len([a for a in monitor.alerts if a.state == "firing"]) == 3
    finally:
        release.set()
        monitor.close()
    assert [a.rule for a in calls] == ["r0", "r1", "r2"]  # close() let the queue finish
    assert monitor.errors == {}


def test_a_callback_sleeping_an_hour_neither_stalls_training_nor_exit(tmp_path):
    """The literal case from the attack: ``on_alert(lambda a: time.sleep(3600))``. Training of
    50 steps ends, close() returns after its bounded wait, and the process exits."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import time, torch, actmon
            from torch import nn
            calls = []
            model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))  # double_softmax fires
            monitor = actmon.watch(model, log_every=5, sinks={"store": {"enabled": False}})
            monitor.on_alert(lambda a: (calls.append(a.rule), time.sleep(3600)))
            start = time.monotonic()
            for step in range(50):
                model(torch.randn(3, 4)).sum().backward()
                monitor.step()
            trained = time.monotonic() - start
            start = time.monotonic()
            monitor.close()
            closed = time.monotonic() - start
            print(f"steps={monitor.step_count} calls={calls} trained={trained:.2f}"
                  f" closed={closed:.2f} errors={monitor.errors}", flush=True)
            """
        )
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    fields = dict(item.split("=", 1) for item in done.stdout.split(" ", 4))
    assert fields["steps"] == "50"
    assert fields["calls"] == "['double_softmax']"
    assert float(fields["trained"]) < 10
    assert callbacks.CLOSE_SECONDS <= float(fields["closed"]) < callbacks.CLOSE_SECONDS + 2
    assert fields["errors"] == "{'(alert callback) unfinished': 1}\n"
    assert (
        "an on_alert callback was still running 5 s after close(); it is left running on its"
        " daemon thread, 0 queued alerts not passed on"
    ) in done.stderr
    assert wall < 60


def _alert(rule: str) -> Alert:
    return Alert(
        rule=rule,
        layer=None,
        severity="warning",
        metric="m",
        value=1.0,
        op=">",
        threshold=0.0,
        step=1,
        first_seen=1,
        summary="",
        runbook="",
        actions=("callback",),
    )


def test_the_queue_is_bounded_and_what_overflows_is_counted():
    """One callback hangs on the first alert: 256 wait, the next 44 are dropped and counted."""
    release, entered = threading.Event(), threading.Event()
    calls: list[str] = []
    reports: list[tuple[str, str]] = []

    def slow(alert: Alert) -> None:
        calls.append(alert.rule)
        entered.set()
        release.wait(60)

    runner = callbacks.CallbackRunner(lambda key, message: reports.append((key, message)))
    runner.add(slow)
    try:
        runner.submit(_alert("r0"))
        assert entered.wait(10)
        start = time.perf_counter()
        for i in range(1, 301):
            runner.submit(_alert(f"r{i}"))
        assert time.perf_counter() - start < 1.0  # never blocks
        assert [key for key, _ in reports] == [callbacks.DROPPED] * 44
    finally:
        release.set()
        runner.close()
    assert calls == [f"r{i}" for i in range(257)]


def test_alerts_beyond_the_queue_are_dropped_counted_and_logged_once(caplog):
    """Through a monitor: 301 alerts fire at one step while the callback hangs; every alert is
    recorded, and each is either passed to the callback or counted as dropped."""
    release = threading.Event()
    calls: list[str] = []

    def slow(alert: Alert) -> None:
        calls.append(alert.rule)
        release.wait(60)

    model = nn.Sequential(nn.Linear(4, 3))
    with caplog.at_level(logging.WARNING, logger="actmon"):
        monitor = actmon.watch(
            model, log_every=2, sample_every=1, rules=_always(301), sinks=NO_STORE
        )
        monitor.on_alert(slow)
        try:
            _train(monitor, model, 4)
            assert len([a for a in monitor.alerts if a.state == "firing"]) == 301
            dropped = monitor.errors[callbacks.DROPPED]
            assert dropped in (44, 45)  # 45 if the thread had not taken r0 yet
        finally:
            release.set()
            monitor.close()
    assert len(calls) + dropped == 301
    order = [int(rule[1:]) for rule in calls]
    assert order == sorted(order)  # in order
    assert order[:256] == list(range(256))
    lines = [r.getMessage() for r in caplog.records if "callbacks are behind" in r.getMessage()]
    assert lines == [
        "actmon: on_alert callbacks are behind (256 alerts waiting); later alerts are not passed"
        " to them (monitor.errors['(alert callback) dropped'] counts them; the alerts are still"
        " logged and sent to the sinks)"
    ]


def test_a_raising_callback_is_counted_and_the_others_still_run(caplog):
    seen: list[str] = []

    def broken(alert: Alert) -> None:
        raise ValueError(f"webhook down for {alert.rule}")

    model = nn.Sequential(nn.Linear(4, 3))
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(
            model, log_every=2, sample_every=1, rules=_always(3), sinks=NO_STORE, strict=True
        ) as monitor,
    ):
        monitor.on_alert(broken)
        monitor.on_alert(lambda a: seen.append(a.rule))
        _train(monitor, model, 4)
    assert seen == ["r0", "r1", "r2"]
    assert monitor.errors == {callbacks.RAISED: 3}
    lines = [r.getMessage() for r in caplog.records if "callback raised" in r.getMessage()]
    assert lines == [
        "actmon: an on_alert callback raised ValueError: webhook down for r0"
        " (monitor.errors['(alert callback)'] counts these)"
    ]


def test_a_callback_may_close_its_runner():
    """A callback that closes the monitor (so its runner) from the callback thread: no join of
    its own thread (a RuntimeError in threading), and nothing reported."""
    reports: list[tuple[str, str]] = []
    done = threading.Event()
    runner = callbacks.CallbackRunner(lambda key, message: reports.append((key, message)))

    def closing(alert: Alert) -> None:
        runner.close()
        done.set()

    runner.add(closing)
    runner.submit(_alert("r0"))
    assert done.wait(10)
    runner.close()  # idempotent from the training thread too
    assert reports == []
    wait_for(  # the thread ended when the closing callback returned
        lambda: "actmon-alert-callbacks" not in {t.name for t in threading.enumerate()},
        timeout=10,
        what="the callback thread to end",
    )


def test_close_waits_a_bounded_time_and_says_what_was_left():
    release, entered = threading.Event(), threading.Event()
    reports: list[tuple[str, str]] = []

    def stuck(alert: Alert) -> None:
        entered.set()
        release.wait(60)

    runner = callbacks.CallbackRunner(lambda key, message: reports.append((key, message)))
    runner.add(stuck)
    for i in range(3):
        runner.submit(_alert(f"r{i}"))
    assert entered.wait(10)
    start = time.monotonic()
    runner.close(timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 1.5
    assert reports == [
        (
            callbacks.UNFINISHED,
            "actmon: an on_alert callback was still running 0.5 s after close(); it is left"
            " running on its daemon thread, 2 queued alerts not passed on",
        )
    ]
    release.set()  # the thread goes on with what was queued, then ends
    wait_for(
        lambda: "actmon-alert-callbacks" not in {t.name for t in threading.enumerate()},
        timeout=10,
        what="the callback thread to end",
    )
