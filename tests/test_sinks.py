"""Sink isolation: a sink that raises, blocks, cannot start or cannot reach its server never stops
training; its errors and dropped windows are counted; the other sinks carry on."""

from __future__ import annotations

import io
import threading

import torch
from rich.console import Console
from torch import nn

import actmon
from actmon import store
from actmon.sinks.console import render_table
from actmon.sinks.prometheus import free_port
from tests.helpers import train_steps, wait_for


def _train(monitor, model, steps):
    train_steps(monitor, model, steps, batch=4, loss=1.0)


class Raising:
    def __init__(self) -> None:
        self.calls = 0

    def write(self, snapshot: actmon.Snapshot) -> None:
        self.calls += 1
        raise OSError("disk full")

    def close(self) -> None:
        pass


class Blocking:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.written = 0

    def write(self, snapshot: actmon.Snapshot) -> None:
        self.release.wait()
        self.written += 1

    def close(self) -> None:
        pass


def _fast_retries(**extra):
    return {"retries": 2, "backoff_seconds": 0.01, **extra}


def test_a_raising_sink_is_retried_counted_and_dropped_while_others_carry_on(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    bad = Raising()
    path = tmp_path / "run.db"
    sinks = _fast_retries(store={"path": str(path)})
    with actmon.watch(model, log_every=2, extra_sinks=[bad], sinks=sinks) as monitor:
        _train(monitor, model, 6)
    assert bad.calls == 3 * 3  # each of 3 windows: 1 attempt + 2 retries
    assert monitor.errors == {"sink:Raising": 9, "dropped:Raising": 3}  # drops are counted too
    assert monitor.dropped_windows == {"store": 0, "Raising": 3}
    assert monitor.internal_errors_total == 12
    with store.open(path) as db:
        assert len(db.windows()) == 3


def test_a_blocked_sink_never_blocks_training_and_its_queue_is_bounded():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    slow = Blocking()
    monitor = actmon.watch(
        model, log_every=1, extra_sinks=[slow], sinks={"store": {"enabled": False}, "queue_size": 2}
    )
    _train(monitor, model, 10)  # returns although the sink has written nothing yet
    assert slow.written == 0
    assert monitor.dropped_windows["Blocking"] >= 7  # 1 in the sink, 2 queued, the rest dropped
    slow.release.set()
    monitor.close()
    assert slow.written + monitor.dropped_windows["Blocking"] == 10


def test_unreachable_pushgateway_is_contained():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sinks = _fast_retries(
        store={"enabled": False},
        prometheus={"enabled": True, "mode": "pushgateway", "pushgateway_url": url},
    )
    with actmon.watch(model, log_every=2, sinks=sinks) as monitor:
        _train(monitor, model, 4)
    assert monitor.step_count == 4
    assert monitor.errors["sink:prometheus"] >= 6  # 2 windows x 3 attempts (+ the push at close)
    assert monitor.dropped_windows["prometheus"] == 2


def test_unwritable_tensorboard_dir_is_contained(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    sinks = {
        "store": {"path": str(tmp_path / "run.db")},
        "tensorboard": {"enabled": True, "log_dir": str(blocker / "tb")},
    }
    with actmon.watch(model, log_every=2, sinks=sinks) as monitor:
        _train(monitor, model, 4)
    assert monitor.errors == {"sink:tensorboard": 1}
    assert set(monitor.sinks) == {"store"}
    with store.open(tmp_path / "run.db") as db:
        assert len(db.windows()) == 2


def test_console_compact_view_shows_the_worst_layers():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    with torch.no_grad():
        model[2].bias.fill_(-50.0)  # layer "3" all dead
    with actmon.watch(
        model, log_every=2, sample_every=1, sinks={"store": {"enabled": False}}
    ) as monitor:
        _train(monitor, model, 2)
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(monitor.snapshot(), worst=1))
    text = out.getvalue()
    assert "│ 3 " in text
    assert "100.0%" in text
    assert "│ 1 " not in text


def test_a_store_locked_by_another_process_is_retried_and_nothing_written_is_lost(tmp_path):
    import sqlite3

    path = tmp_path / "run.db"
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    sinks = {
        "store": {"path": str(path), "busy_timeout_seconds": 0.05},
        "retries": 1,
        "backoff_seconds": 0.01,
    }
    monitor = actmon.watch(model, log_every=2, sinks=sinks)
    _train(monitor, model, 2)  # window 1 written before the lock
    wait_for(lambda: monitor.delivered_windows["store"] >= 1, what="window 1 in the store")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the file
    _train(monitor, model, 2)  # window 2: the writes fail, are retried, then dropped
    wait_for(lambda: monitor.dropped_windows["store"] >= 1, what="window 2 dropped")
    other.execute("COMMIT")
    other.close()
    _train(monitor, model, 2)  # window 3 goes through again
    monitor.close()
    assert monitor.step_count == 6
    assert monitor.errors["sink:store"] >= 2
    with store.open(path) as db:
        assert [w.step for w in db.windows()] == [2, 6]


def test_the_store_directory_removed_mid_run_does_not_stop_training(tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    monitor = actmon.watch(model, log_every=2, sinks={"store": {"path": str(run_dir / "a.db")}})
    _train(monitor, model, 2)
    wait_for(lambda: monitor.delivered_windows["store"] >= 1, what="window 1 in the store")
    shutil.rmtree(run_dir)
    _train(monitor, model, 4)
    monitor.close()
    assert monitor.step_count == 6  # training went on; the open file was written to its end


def test_a_pushgateway_answering_500_is_retried_and_counted():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Failing(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # push_to_gateway uses PUT
            hits.append(self.path)
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
        url = f"http://127.0.0.1:{server.server_address[1]}"
        sinks = _fast_retries(
            store={"enabled": False},
            prometheus={"enabled": True, "mode": "pushgateway", "pushgateway_url": url},
        )
        with actmon.watch(model, run_name="r", log_every=2, sinks=sinks) as monitor:
            _train(monitor, model, 4)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert monitor.step_count == 4
    assert len(hits) >= 6  # 2 windows x (1 + 2 retries), then the push at close
    assert all(h == "/metrics/job/actmon/run/r" for h in hits)
    assert monitor.dropped_windows["prometheus"] == 2
    assert monitor.errors["sink:prometheus"] >= 6


def test_console_lists_nan_layers_first_and_never_prints_a_header_only_table():
    from actmon.sinks.console import ConsoleSink

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    with torch.no_grad():
        model[2].weight.fill_(float("nan"))  # layers "2" and "3" output NaN
    with actmon.watch(
        model, log_every=1, sample_every=1, sinks={"store": {"enabled": False}}
    ) as monitor:
        model(torch.randn(4, 6))  # no backward: layers "0" and "1" see no NaN gradient
        monitor.step()
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(monitor.snapshot()))
    rows = [line.split("│")[1].strip() for line in out.getvalue().splitlines() if "│" in line]
    assert rows == ["2", "3", "0", "1"]  # NaN layers first, then forward order
    empty = actmon.Snapshot(
        run="r",
        step=3,
        window=(1, 3),
        sampled_steps=(1,),
        loss=0.5,
        loss_last=0.5,
        losses=(0.5,) * 3,
        grad_norm_total=None,
        grad_norm_total_max=None,
        grad_norms_total=(),
        first_nonfinite=None,
        layers={},
        params={},
    )
    printed = io.StringIO()
    sink = ConsoleSink(console=Console(file=printed, width=200))
    sink.write(empty)
    assert printed.getvalue() == (
        "actmon r: steps 1-3, loss 0.5, grad norm -; no monitored layer has run yet\n"
    )


class _MarkupNames(nn.Module):
    """Layers whose names are rich markup (and an emoji code) if read as markup."""

    def __init__(self) -> None:
        super().__init__()
        from tests.test_monitor import NaNAt

        self.add_module("[/]closing[bold red]", NaNAt(step=2))
        self.add_module("exp[bold]1", nn.ReLU())
        self.add_module(":smile:", nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def test_console_prints_markup_in_run_and_layer_names_literally():
    from actmon.sinks.console import ConsoleSink

    model = _MarkupNames()
    out = io.StringIO()
    sink = ConsoleSink(console=Console(file=out, width=1000, color_system=None))
    sinks = {"store": {"enabled": False}, "console": {"enabled": False}}
    with actmon.watch(
        model, log_every=2, sample_every=1, run_name="exp[/]1", sinks=sinks, extra_sinks=[sink]
    ) as monitor:
        for _ in range(4):
            model(torch.randn(3, 4)).sum().backward()
            monitor.step()
    assert monitor.errors == {}  # the console sink never failed a window
    assert list(monitor.delivered_windows.values()) == [2]
    text = out.getvalue()
    assert "actmon exp[/]1: steps 1-2" in text
    assert "actmon exp[/]1: steps 3-4" in text
    rows = [line.split("│")[1].strip() for line in text.splitlines() if "│" in line]
    assert rows[:3] == ["[/]closing[bold red]", "exp[bold]1", ":smile:"]
    nan_alert = next(a for a in monitor.alerts if a.rule == "nonfinite")
    assert nan_alert.layer == "[/]closing[bold red]"
    assert f"actmon alert {nan_alert.message()}\n" in text
