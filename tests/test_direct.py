"""CPU calls the fused kernels add straight into the window against the slot-row path.

On a CPU with the fused kernels, a contiguous output (and, without loss scaling, its output
gradient) is added into the layer's window rows in place; softmax outputs, non-contiguous
outputs, other devices and ``ACTMON_FUSED=0`` go through per-call slot rows folded at the end
of the step. Both must give the same Snapshot: counts, histograms, units and the first
non-finite layer exactly, sums to float rounding.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import actmon
from actmon import aggregate, histogram, stats
from tests.test_monitor import NaNAt

if stats.FUSED is None:
    pytest.skip("actmon._fused is not built here", allow_module_level=True)


class Transposed(nn.Module):
    """A non-contiguous output: the slot path even where the kernels are fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.t()


class Back(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.t().contiguous()


def mixed_model() -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(20, 32),
        nn.ReLU(),  # units: dead-unit tracking
        Transposed(),
        Back(),
        nn.Tanh(),  # saturation and the linear histogram
        NaNAt(step=9),  # a non-finite output in the last window
        nn.Linear(32, 12),
        nn.Softmax(dim=-1),  # softmax statistics: always the slot path
    )
    with torch.no_grad():
        model[0].bias[:6] = -100.0  # dead ReLU units
    return model


def run(monkeypatch: pytest.MonkeyPatch, direct: bool) -> tuple[list, list]:
    """Train the mixed model 9 steps (windows of 4) with or without the direct path."""
    calls: list[str] = []
    if not direct:
        monkeypatch.setattr(stats, "fusable", lambda x: False)  # every call in a slot row
    else:
        into = aggregate.Aggregator.forward_addresses

        def spy(self, layer, units):
            calls.append("direct")
            return into(self, layer, units)

        monkeypatch.setattr(aggregate.Aggregator, "forward_addresses", spy)
    model = mixed_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = actmon.watch(model, opt, log_every=4, sample_every=1, gradients={"histogram": True})
    gen = torch.Generator().manual_seed(5)
    snaps = []
    for _ in range(9):
        x = torch.randn(16, 20, generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        snap = monitor.step(loss=loss)
        if snap is not None:
            snaps.append(snap)
    monitor.close()
    snaps.append(monitor.snapshot())
    monkeypatch.undo()
    return snaps, calls


def _same(a: object, b: object, where: str) -> None:
    if isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where  # type: ignore[union-attr]
        for key in a:
            _same(a[key], b[key], f"{where}[{key}]")  # type: ignore[index]
    elif isinstance(a, float) and not isinstance(b, int):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-6), (
            where,
            a,
            b,
        )
    else:
        assert a == b, (where, a, b)


def assert_same_snapshots(got: list[actmon.Snapshot], want: list[actmon.Snapshot]) -> None:
    """Window by window: the same first non-finite value, layers and every LayerStats field."""
    for g, w in zip(got, want, strict=True):
        assert g.first_nonfinite == w.first_nonfinite
        assert g.layers.keys() == w.layers.keys()
        for name, layer in g.layers.items():
            for f in dataclasses.fields(layer):
                _same(getattr(layer, f.name), getattr(w.layers[name], f.name), f"{name}.{f.name}")


def test_direct_window_rows_equal_the_slot_row_path(monkeypatch):
    direct, calls = run(monkeypatch, direct=True)
    slots, _ = run(monkeypatch, direct=False)
    assert calls, "the direct path never ran"
    assert len(direct) == len(slots) == 3
    assert_same_snapshots(direct, slots)
    last = direct[-1]
    # The injected layer is the first non-finite one, found in the mixed step's call order.
    assert last.first_nonfinite == actmon.NonFinite(
        step=9, source="activation", layer="5", confirmed_step=9
    )
    assert last.layers["1"].dead_units == 6
    assert last.layers["7"].softmax_entropy is not None


def test_direct_path_statistics_equal_plain_torch(monkeypatch):
    """The in-place rows against plain torch on the same tensors: one ReLU layer, one window."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU())
    outputs: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    grads: list[torch.Tensor] = []
    monitor = actmon.watch(model, log_every=3, sample_every=1, gradients={"histogram": True})
    for _ in range(3):
        out = model(torch.randn(40, 10))
        out.register_hook(lambda g: grads.append(g.clone()))
        out.sum().backward()
        snap = monitor.step()
    monitor.close()
    layer = snap.layers["1"]
    acts = torch.cat([o.reshape(-1) for o in outputs]).double()
    assert layer.count == acts.numel() == 3 * 40 * 64
    assert layer.zero_fraction == (acts == 0).sum().item() / acts.numel()
    assert layer.mean == pytest.approx(acts.mean().item(), rel=1e-6)
    assert layer.max == pytest.approx(acts.max().item())
    per_unit = torch.stack([o.amax(0) for o in outputs]).amax(0)
    assert layer.dead_units == int((per_unit <= 0).sum())
    g = torch.cat([x.reshape(-1) for x in grads]).double()
    per_step = [x.double().norm() ** 2 for x in grads]
    assert layer.output_grad_norm == pytest.approx(math.sqrt(sum(per_step) / 3), rel=1e-6)
    assert layer.output_grad_abs_max == pytest.approx(g.abs().max().item())

    def view(tensors: list[torch.Tensor]) -> np.ndarray:
        bits = torch.cat([x.reshape(-1) for x in tensors]).view(torch.int32)
        raw = torch.bincount((bits >> 21) + 1024, minlength=2048).numpy()
        return histogram.symlog_view(raw, -24, 24, 4)[1]  # the default exported view

    assert np.array_equal(layer.hist_counts, view(outputs))
    assert np.array_equal(layer.output_grad_hist_counts, view(grads))
