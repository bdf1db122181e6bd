"""A watch() that fails part-way undoes everything it started.

Sinks' threads, the metrics server and its socket, and every hook on the model, its parameters,
the optimizer and the loss are gone when the error reaches the caller; failing again and again
leaves nothing behind, and the model can then be watched as if nothing had happened.
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actmon
import actmon.lifecycle
import actmon.monitor
import actmon.store


class Net(nn.Module):
    """Modules and a functional activation (functional capture puts hooks on every module)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _hooks(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module) -> dict[str, Any]:
    """Every hook slot actmon could touch, with how many hooks each holds."""
    counts: dict[str, Any] = {}
    for name, m in [*model.named_modules(), ("(loss)", loss_fn)]:
        for slot in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_always_called",
        ):
            counts[f"{name}:{slot}"] = len(getattr(m, slot))
    for name, p in model.named_parameters():
        hooks = p._post_accumulate_grad_hooks
        counts[f"{name}:post_accumulate"] = None if hooks is None else len(hooks)
        counts[f"{name}:tensor"] = None if p._backward_hooks is None else len(p._backward_hooks)
    counts["opt:pre"] = len(opt._optimizer_step_pre_hooks)
    counts["opt:post"] = len(opt._optimizer_step_post_hooks)
    module = torch.nn.modules.module
    counts["global"] = (
        len(module._global_forward_hooks),
        len(module._global_forward_pre_hooks),
        len(module._global_backward_hooks),
    )
    return counts


def _fail_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step of watch() raises: sinks, server and hooks are all up by then."""

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("late failure")

    monkeypatch.setattr(actmon.monitor, "NonFiniteAttribution", boom)


class _NoStepHooks(torch.optim.SGD):
    """An optimizer whose step hooks cannot be registered (watch() accepts its type)."""

    def register_step_pre_hook(self, hook: Any) -> Any:
        raise RuntimeError("no step hooks")


class _NoLossHooks(nn.CrossEntropyLoss):
    """A loss module whose forward pre-hook cannot be registered."""

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no loss hooks")


def _fail_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """The very last step raises: the monitor is registered for SIGTERM and exit by then."""

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("last failure")

    monkeypatch.setattr(actmon.monitor.Attacher, "set_sampling", boom)


FAILURES = {
    # name -> (how to make watch() fail, the error it raises)
    "a late step raises": (_fail_late, RuntimeError),
    "the last step raises": (_fail_last, RuntimeError),
    # the hooks on the model are in when the optimizer's cannot be registered
    "an optimizer without step hooks": ("optimizer", Exception),
    # sinks and every hook are in when the loss's pre-hook cannot be registered
    "a loss whose hook cannot be registered": ("loss", Exception),
    # the store is built when the Prometheus port turns out to be taken
    "the metrics port is taken": ("port", actmon.ConfigError),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_watch_leaves_no_thread_socket_or_hook(failure, monkeypatch, tmp_path):
    how, error = FAILURES[failure]
    model, loss_fn = Net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_hooks = _hooks(model, opt, loss_fn)
    before_threads = set(threading.enumerate())
    before_sigterm = signal.getsignal(signal.SIGTERM)
    port = _free_port()
    sinks: dict[str, Any] = {
        "prometheus": {"enabled": True, "port": port, "port_in_use": "error"},
        "tensorboard": {"enabled": True, "log_dir": str(tmp_path / "tb")},
        "store": {"enabled": True, "path": str(tmp_path / "actmon.db")},
    }
    args: dict[str, Any] = {"optimizer": opt, "loss_fn": loss_fn}
    taken = None
    if callable(how):
        how(monkeypatch)
    elif how == "optimizer":
        args["optimizer"] = [opt, _NoStepHooks(model.parameters(), lr=0.1)]
    elif how == "loss":
        args["loss_fn"] = _NoLossHooks()
    else:
        taken = socket.socket()
        taken.bind(("127.0.0.1", port))
        taken.listen()
    try:
        for _ in range(3):  # nothing accumulates from one failed attempt to the next
            with pytest.raises(error):
                actmon.watch(model, sinks=sinks, run_name="exp", **args)
            left = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
            assert left == []
            assert _hooks(model, opt, loss_fn) == before_hooks
            assert signal.getsignal(signal.SIGTERM) is before_sigterm
            assert actmon.lifecycle._monitors() == []
            assert all(actmon.lifecycle.name_free(n) for n in ("exp", "exp-2", "exp-3"))
            if taken is None:
                assert _port_is_free(port)
    finally:
        if taken is not None:
            taken.close()
    monkeypatch.undo()
    # The model was never left "watched": a real watch() works and serves on that port.
    with actmon.watch(model, opt, loss_fn=loss_fn, sinks=sinks, log_every=1) as monitor:
        assert monitor.prometheus_url == f"http://127.0.0.1:{port}/metrics"
        loss = loss_fn(model(torch.randn(3, 4)), torch.tensor([0, 1, 0]))
        loss.backward()
        opt.step()
        monitor.step(loss=loss)
    assert monitor.snapshot() is not None
    assert _hooks(model, opt, loss_fn) == before_hooks
    assert _port_is_free(port)
    # A failed start is recorded as a failed run with no window; the real run is finished.
    with actmon.store.open(tmp_path / "actmon.db") as db:
        runs = db.runs()
        assert runs[-1].status == "finished"
        assert len(db.windows(runs[-1].run)) == 1
        for run in runs[:-1]:
            assert (run.status, db.windows(run.run)) == ("failed", [])
