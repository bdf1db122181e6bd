"""Legal models with odd shapes watch and train: zero-width layers, meta tensors, one weight.

The model checks skip what they cannot measure (no values, no device data) and contain the rest:
a check that fails is counted under ``(model check) <name>`` and logged once; watch() goes on.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import actmon
import actmon.checks

NO_STORE = {"store": {"enabled": False}}


def _quiet(make):
    def build() -> nn.Module:
        with warnings.catch_warnings():  # torch: "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore", UserWarning)
            return make()

    return build


# name -> (model factory, input shape or None when torch itself cannot run the model)
MODELS = {
    "Linear(0, 4)": (_quiet(lambda: nn.Sequential(nn.Linear(0, 4), nn.ReLU())), (3, 0)),
    "Linear(4, 0)": (_quiet(lambda: nn.Sequential(nn.Linear(4, 0), nn.ReLU())), (3, 4)),
    # torch's conv2d refuses a weight with 0 output channels: watch() and close() only
    "Conv2d(3, 0, 3)": (_quiet(lambda: nn.Sequential(nn.Conv2d(3, 0, 3), nn.ReLU())), None),
    "Linear(1, 1)": (lambda: nn.Sequential(nn.Linear(1, 1), nn.Tanh()), (3, 1)),  # no std
    "Linear(0, 4) then Linear(4, 2)": (
        _quiet(lambda: nn.Sequential(nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid())),
        (3, 0),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_width_and_tiny_layers_watch_and_train(name):
    make, shape = MODELS[name]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with actmon.watch(model, opt, log_every=1, sample_every=1, sinks=NO_STORE) as monitor:
        if shape is not None:
            out = model(torch.randn(*shape))
            loss = out.sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            snap = monitor.step(loss=loss)
            assert snap is not None
            assert snap.loss == pytest.approx(float(loss.detach()))
    assert monitor.errors == {}
    assert [a.rule for a in monitor.alerts if a.rule == "init_mismatch"] == []


def test_zero_input_linear_reports_its_bias():
    """Linear(0, 4) outputs its bias for every row: the statistics say so."""
    model = _quiet(lambda: nn.Sequential(nn.Linear(0, 4)))()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([1.0, -2.0, 3.0, 0.0]))
    with actmon.watch(model, log_every=1, sample_every=1, sinks=NO_STORE) as monitor:
        model(torch.randn(5, 0)).sum().backward()
        snap = monitor.step()
    stats = snap.layers["0"]
    assert (stats.count, stats.mean, stats.min, stats.max) == (20, 0.5, -2.0, 3.0)
    assert stats.zero_fraction == 0.25
    assert monitor.errors == {}


def test_meta_device_model_watches_and_closes():
    """A meta model (built for shape inference or before loading weights) has no values:
    checks read nothing, no buffer is made, and close() leaves the model as it was."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh()).to("meta")
    hooks = [len(m._forward_hooks) for m in model.modules()]
    monitor = actmon.watch(model, log_every=1)
    assert monitor.errors == {}
    monitor.close()
    assert monitor.alerts == []
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


def test_a_failing_check_is_counted_logged_once_and_the_others_run(monkeypatch, caplog):
    def broken(*args: object) -> list[actmon.Alert]:
        raise RuntimeError("cannot read this weight")

    monkeypatch.setattr(actmon.checks, "_init_check", broken)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh()
    )
    model.append(nn.Linear(4, 1))
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(model, log_every=1, sinks=NO_STORE) as monitor,
    ):
        model(torch.randn(2, 4)).sum().backward()
        monitor.step()
    # one failure per Linear followed by a layer: 6 pairs
    assert monitor.errors == {"(model check) init_mismatch": 6}
    lines = [r.getMessage() for r in caplog.records if "(model check)" in r.getMessage()]
    assert lines == [
        "actmon: (model check) init_mismatch skipped after an error: RuntimeError: cannot read"
        " this weight"
    ]
    assert [a.rule for a in monitor.alerts] == ["saturating_hidden_stack"]  # still checked


def test_the_loss_input_check_waits_for_a_batch_with_values():
    """An empty first batch (x.min() of nothing raises in torch) is not read; the next is."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))
    loss_fn = nn.CrossEntropyLoss()
    with actmon.watch(model, log_every=1, loss_fn=loss_fn, sinks=NO_STORE) as monitor:
        for batch in (0, 4):
            x = torch.randn(batch, 4)
            loss = loss_fn(model(x), torch.zeros(batch, dtype=torch.long))
            if batch:
                loss.backward()
                monitor.step(loss=loss)
    assert monitor.errors == {}
    assert [(a.rule, a.metric, a.step) for a in monitor.alerts] == [
        ("double_softmax", "loss_input_is_probability", 1)
    ]


def test_a_failing_loss_input_check_never_reaches_the_loss(monkeypatch):
    def broken(loss_fn: nn.Module, x: torch.Tensor) -> str | None:
        raise RuntimeError("odd input")

    monkeypatch.setattr(actmon.checks, "_probabilities", broken)
    model = nn.Sequential(nn.Linear(4, 3))
    loss_fn = nn.CrossEntropyLoss()
    with actmon.watch(model, log_every=1, loss_fn=loss_fn, sinks=NO_STORE) as monitor:
        for _ in range(2):
            loss = loss_fn(model(torch.randn(4, 4)), torch.zeros(4, dtype=torch.long))
            loss.backward()
            monitor.step(loss=loss)
    assert monitor.errors == {"(model check) double_softmax": 1}  # one-shot: tried once


def test_a_lazy_model_is_refused_until_its_weights_exist():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(
        actmon.MonitorStateError,
        match=r"watch\(\): parameter '0.weight' \(LazyLinear\) is not initialised yet; run one"
        r" forward pass \(model\(example_batch\)\) before watch\(\)",
    ):
        actmon.watch(model, sinks=NO_STORE)
    model(torch.randn(2, 3))  # materialised: the same parameters, now watchable
    with actmon.watch(model, log_every=1, sample_every=1, sinks=NO_STORE) as monitor:
        model(torch.randn(2, 3)).sum().backward()
        snap = monitor.step()
    assert snap.layers["0"].count == 8
    assert monitor.errors == {}
