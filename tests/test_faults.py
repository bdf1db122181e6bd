"""Faults inside hooks and user errors: training continues, the cause is counted and named once."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import actmon

NO_STORE = {"store": {"enabled": False}}


class Emits(nn.Module):
    """A leaf whose output is whatever ``make(x)`` returns; the model's real path is ``lin``."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, x: torch.Tensor):
        return self.make(x)


class Host(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.lin, self.odd = nn.Linear(6, 6), Emits(make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.odd(x)
        return self.lin(x)


FAULTS = {
    "tuple": (lambda x: (x * 2, "meta"), None),
    "dict": (lambda x: {"a": x + 1, "b": 3}, None),
    "none": (lambda x: None, None),
    "string": (lambda x: "not a tensor", None),
    "zero-element": (lambda x: x[:0], None),
    # non-float outputs are left out of the statistics quietly (tests/test_legal_models.py)
    "int tensor": (lambda x: x.argmax(-1), None),
    "bool tensor": (lambda x: x > 0, None),
    "complex tensor": (lambda x: torch.complex(x, x), None),
    "sparse tensor": (lambda x: x.detach().to_sparse(), "layout torch.sparse_coo"),
    "0-d output": (lambda x: x.sum(), None),
    "tensor on another device": (
        lambda x: torch.empty(3, 6, device="meta"),
        "is on meta, the monitor's buffers on cpu",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_odd_outputs_never_break_training(fault, caplog):
    make, cause = FAULTS[fault]
    model = Host(make)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(model, optimizer=opt, log_every=2, sample_every=1, sinks=NO_STORE) as monitor,
    ):
        for _ in range(4):
            model(torch.randn(3, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    assert monitor.snapshot().layers["lin"].calls == 2  # the real layer kept going
    if cause is None:
        assert monitor.errors == {}
    else:
        assert monitor.errors == {"odd": 1}
        lines = [r.getMessage() for r in caplog.records if "'odd'" in r.getMessage()]
        assert len(lines) == 1
        assert cause in lines[0]


def test_tuple_output_summarises_its_first_tensor():
    model = Host(lambda x: (x * 2, "meta"))
    with actmon.watch(model, log_every=1, sample_every=1, sinks=NO_STORE) as monitor:
        x = torch.randn(3, 6)
        model(x).sum().backward()
        monitor.step()
    assert monitor.snapshot().layers["odd"].mean == pytest.approx(float((x * 2).mean()), rel=1e-6)


def test_step_never_called_still_flushes_at_close():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    with actmon.watch(model, log_every=5, sample_every=1, sinks=NO_STORE) as monitor:
        model(torch.randn(2, 6)).sum().backward()
    assert monitor.snapshot() is None  # no step ended: nothing to report, nothing raised
    assert monitor.step_count == 0


def test_step_called_twice_per_optimizer_step_counts_two_steps():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with actmon.watch(model, optimizer=opt, log_every=4, sample_every=1, sinks=NO_STORE) as monitor:
        for _ in range(2):
            model(torch.randn(2, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
            monitor.step()  # documented: every call ends a step; the second one is empty
    snap = monitor.snapshot()
    assert snap.window == (1, 4)
    assert snap.layers["1"].calls == 2
    assert sum(1 for v in snap.grad_norms_total if v == v) == 2  # gradient norms on 2 steps


def test_model_moved_to_another_dtype_after_watch():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    with actmon.watch(model, log_every=2, sample_every=1, sinks=NO_STORE) as monitor:
        model(torch.randn(2, 6)).sum().backward()
        monitor.step()
        model.double()
        model(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
        monitor.step()
    relu = monitor.snapshot().layers["1"]
    assert relu.calls == 2  # float64 outputs are summarised in float32
    assert monitor.errors == {}


def test_layers_added_after_watch_are_not_monitored():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    with actmon.watch(model, log_every=1, sample_every=1, sinks=NO_STORE) as monitor:
        model.append(nn.Linear(4, 2))
        model(torch.randn(2, 6)).sum().backward()
        monitor.step()
    assert set(monitor.snapshot().layers) == {"0", "1"}
    assert [info.name for info in monitor.layers] == ["0", "1"]


def test_step_after_close_is_ignored_and_logged_once(caplog):
    model = nn.Sequential(nn.Linear(6, 4))
    monitor = actmon.watch(model, sinks=NO_STORE)
    monitor.close()
    with caplog.at_level(logging.WARNING, logger="actmon"):
        assert monitor.step() is None
        assert monitor.step() is None
    assert sum("after close()" in r.getMessage() for r in caplog.records) == 1


def test_a_non_scalar_loss_is_counted_and_reduced_by_its_mean():
    model = nn.Sequential(nn.Linear(6, 4))
    with actmon.watch(model, log_every=1, sinks=NO_STORE) as monitor:
        monitor.step(loss=torch.tensor([1.0, 2.0, 6.0]))
    assert monitor.errors == {"(step) loss": 1}
    assert monitor.snapshot().loss == 3.0


def test_a_unit_axis_that_cannot_apply_is_contained(caplog):
    model = Host(lambda x: x * 2)
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(
            model, unit_axis={"odd": 5}, kinds={"odd": "relu"}, log_every=1, sinks=NO_STORE
        ) as monitor,
    ):
        model(torch.randn(3, 6)).sum().backward()
        monitor.step()
    assert monitor.errors == {"odd": 1}
    assert any(
        "unit axis 5 is out of range for an output of shape (3, 6)" in r.getMessage()
        for r in caplog.records
    )
    assert monitor.snapshot().layers["lin"].calls == 1
