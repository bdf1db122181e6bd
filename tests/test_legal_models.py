"""Legal models with odd shapes watch and train: zero-width layers, meta tensors, one weight.

The model checks skip what they cannot measure (no values, no device data) and contain the rest:
a check that fails is counted under ``(model check) <name>`` and logged once; watch() goes on.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

import actmon
import actmon.checks
import actmon.store

NO_STORE = {"store": {"enabled": False}}


def _quiet(make):
    def build() -> nn.Module:
        with warnings.catch_warnings():  # torch: "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore", UserWarning)
            return make()

    return build


# name -> (model factory, input shape or None when torch itself cannot run the model,
#          elements counted per layer in the step)
MODELS = {
    "Linear(0, 4)": (
        _quiet(lambda: nn.Sequential(nn.Linear(0, 4), nn.ReLU())),
        (3, 0),
        {"0": 12, "1": 12},
    ),
    "Linear(4, 0)": (  # zero-width outputs: listed, nothing counted
        _quiet(lambda: nn.Sequential(nn.Linear(4, 0), nn.ReLU())),
        (3, 4),
        {"0": 0, "1": 0},
    ),
    # torch's conv2d refuses a weight with 0 output channels: watch() and close() only
    "Conv2d(3, 0, 3)": (
        _quiet(lambda: nn.Sequential(nn.Conv2d(3, 0, 3), nn.ReLU())),
        None,
        {},
    ),
    "Linear(1, 1)": (  # one weight: no std to compare with an init scale
        lambda: nn.Sequential(nn.Linear(1, 1), nn.Tanh()),
        (3, 1),
        {"0": 3, "1": 3},
    ),
    "Linear(0, 4) then Linear(4, 2)": (
        _quiet(lambda: nn.Sequential(nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid())),
        (3, 0),
        {"0": 12, "1": 12, "2": 6, "3": 6},
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_width_and_tiny_layers_watch_and_train(name):
    make, shape, counts = MODELS[name]
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
            assert {k: v.count for k, v in snap.layers.items()} == counts
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


def test_meta_device_model_watches_and_closes(caplog):
    """A meta model (built for shape inference or before loading weights) has no values:
    checks read nothing, no buffer is made, and close() leaves the model as it was. One
    warning says that parameter norms need watch() after the real parameters exist."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh()).to("meta")
    hooks = [len(m._forward_hooks) for m in model.modules()]
    with caplog.at_level(logging.WARNING, logger="actmon"):
        monitor = actmon.watch(model, log_every=1)
    assert monitor.errors == {}
    monitor.close()
    assert [r.getMessage() for r in caplog.records] == [
        "actmon: the model's parameters are on the meta device: its layers are watched once it"
        " runs, but parameter-gradient norms and update ratios are not, as to_empty() or"
        " load_state_dict(assign=True) make new parameters; call watch() after the model has"
        " its real parameters"
    ]
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


class Argmax(nn.Module):
    """Token indices for an Embedding: an int64 output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


class Positive(nn.Module):
    """A bool mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x > 0


class Quantised(nn.Module):
    """A uint8 image-like output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(0, 1) * 255).to(torch.uint8)


class Picker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), nn.ReLU()
        self.index, self.emb = Argmax(), nn.Embedding(4, 3)
        self.mask, self.image = Positive(), Quantised()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.lin(x))
        keep = self.mask(h)
        self.image(h)
        return self.emb(self.index(h)).sum() + (h * keep).sum()


def test_non_float_outputs_are_left_out_quietly(caplog):
    """int, bool and uint8 outputs are no internal error and do not disable anything: one INFO
    line per layer the first time, and the float layers' figures are those of a reference."""
    model = Picker()
    embedded: list[torch.Tensor] = []
    model.emb.register_forward_hook(lambda m, a, out: embedded.append(out.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        caplog.at_level(logging.INFO, logger="actmon"),
        actmon.watch(
            model, opt, log_every=2, sample_every=1, strict=True, sinks=NO_STORE
        ) as monitor,
    ):
        for _ in range(4):
            model(torch.randn(5, 4)).backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    assert monitor.errors == {}
    snap = monitor.snapshot()
    assert list(snap.layers) == ["lin", "act", "emb"]
    emb = torch.cat(embedded[2:]).double()
    assert snap.layers["emb"].count == emb.numel() == 30
    assert snap.layers["emb"].mean == pytest.approx(float(emb.mean()), rel=1e-6)
    assert snap.layers["emb"].calls == 2
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if "floating" in r.getMessage()]
    assert messages == [
        (
            logging.INFO,
            f"actmon: layer {name!r} outputs {dtype}, not floating point; it is left out of the"
            " statistics",
        )
        for name, dtype in (
            ("mask", "torch.bool"),
            ("image", "torch.uint8"),
            ("index", "torch.int64"),
        )
    ]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_an_empty_batch_keeps_its_layers_with_zero_counts():
    """A window of empty batches lists every layer that ran, with count 0 and NaN figures that
    no default rule reads as a fault; a window mixing empty and full batches counts the full."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Sigmoid())
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = []
    with actmon.watch(model, opt, log_every=2, sample_every=1, strict=True) as monitor:
        for batch in (0, 0, 3, 0, 0, 0):
            loss = model(torch.randn(batch, 4)).sum()  # an empty sum is 0: a finite loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            snap = monitor.step(loss=loss)
            if snap is not None:
                snaps.append(snap)
    assert monitor.errors == {}
    assert monitor.alerts == []
    names = ["0", "1", "2", "3"]
    for snap in (snaps[0], snaps[2]):
        assert list(snap.layers) == names
        for stats in snap.layers.values():
            assert (stats.count, stats.calls, stats.as_of_step) == (0, 2, snap.step)
            assert all(math.isnan(v) for v in (stats.mean, stats.std, stats.min, stats.max))
            assert math.isnan(stats.zero_fraction)
            assert stats.dead_fraction is None  # no unit was seen: not "every unit dead"
            assert stats.nan_count == stats.posinf_count == stats.neginf_count == 0
        assert math.isnan(snap.layers["3"].saturation_fraction)
    relu = snaps[1].layers["1"]
    assert (relu.count, relu.calls, relu.sampled_steps) == (18, 2, 1)
    assert relu.mean == pytest.approx(float(seen[2].double().mean()), rel=1e-6)
    assert relu.dead_fraction == float((seen[2].amax(0) <= 0).double().mean())
    with actmon.store.open(monitor.sinks["store"].path) as db:
        assert [w.step for w in db.windows()] == [2, 4, 6]
        assert db.series("count", "1") == [(2, 0.0), (4, 18.0), (6, 0.0)]


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_sparse_embedding_gradients_have_their_norms(with_optimizer):
    """nn.Embedding(sparse=True) gets a sparse COO gradient; with repeated indices its norm is
    that of the dense gradient (rows of one index summed), not an error."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if with_optimizer else None
    tokens = torch.tensor([1, 3, 1, 1, 7])  # index 1 three times
    with actmon.watch(model, opt, log_every=1, sample_every=1, strict=True, sinks=NO_STORE) as m:
        model(tokens).pow(2).sum().backward()
        grad = model[0].weight.grad
        assert grad.layout is torch.sparse_coo
        dense = float(grad.to_dense().norm())
        total = float(
            torch.cat(
                [
                    grad.to_dense().reshape(-1),
                    model[1].weight.grad.reshape(-1),
                    model[1].bias.grad.reshape(-1),
                ]
            ).norm()
        )
        if opt is not None:
            opt.step()
            opt.zero_grad()
        snap = m.step()
    assert m.errors == {}
    assert snap.params["0.weight"].grad_norm == pytest.approx(dense, rel=1e-6)
    assert snap.grad_norm_total == pytest.approx(total, rel=1e-6)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


@pytest.mark.parametrize("scripted", ["the model", "a submodule"])
def test_torchscript_is_refused_before_anything_starts(scripted):
    """torch refuses hooks on TorchScript modules: a clear error, and no thread or hook left."""
    with warnings.catch_warnings():  # torch: "torch.jit.script is deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        block = torch.jit.script(_Block())
    if scripted == "the model":
        model: nn.Module = block
        what = "model"
    else:
        model = nn.Sequential(nn.Linear(4, 4), block)
        what = "module '1' of the model"
    with pytest.raises(
        actmon.ArgumentError,
        match=rf"watch\(model=\.\.\.\): the {what} is a TorchScript module"
        r" \(RecursiveScriptModule\), and torch allows no hooks on those; watch the eager model",
    ):
        actmon.watch(model, sinks={"prometheus": {"enabled": True, "port": 0}})
    assert model(torch.randn(2, 4)).shape == (2, 4)
