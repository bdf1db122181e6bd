"""Mixed precision: fp16 overflow at the right layer, GradScaler skips counted, not alarmed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import actmon
from actmon import stats
from tests.conftest import reference_raw_hist


def test_unscale_hist_moves_power_of_two_scaled_values_back_to_their_bins():
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    x[:5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    for exponent in (16, 3, -2):
        scale = torch.tensor([2.0**exponent])
        scaled = x * scale
        moved = stats.unscale_hist(torch.from_numpy(reference_raw_hist([scaled])), scale)
        np.testing.assert_array_equal(moved.numpy(), reference_raw_hist([x]))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_gradscaler_skipped_steps_are_counted_and_gradients_unscaled():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # A scale far too high: fp16 output gradients overflow until the scaler has halved it
    # enough; those steps are skipped by the scaler and must not raise the NaN alarm.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    grads: list[list[torch.Tensor]] = []  # per step: fc1's output gradients as backward saw them

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: grads[-1].append(g.detach().float()))

    model.fc1.register_forward_hook(keep)
    scales: list[float] = []
    alerts: list[actmon.Alert] = []
    steps = 40
    monitor = actmon.watch(model, opt, scaler=scaler, sample_every=1, log_every=steps, strict=True)
    monitor.on_alert(alerts.append)
    for _ in range(steps):
        grads.append([])
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(torch.randn(8, 16))
        loss = out.float().pow(2).mean()
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        monitor.step(loss)
    monitor.close()
    snap = monitor.snapshot()
    assert snap is not None
    after = [*scales[1:], scaler.get_scale()]
    skipped_steps = [b < a for a, b in zip(scales, after, strict=True)]  # the scaler backed off
    skipped = sum(skipped_steps)
    assert skipped >= 5  # the scenario really skipped steps
    assert snap.amp_skipped_steps == skipped
    assert snap.amp_skip_fraction == skipped / steps
    assert snap.nonfinite_count == 0
    assert not [a for a in alerts if a.rule == "nonfinite"]
    # Output gradients of the kept steps, divided by the scale their backward ran with.
    kept = [
        g / scale
        for step, scale, skip in zip(grads, scales, skipped_steps, strict=True)
        if not skip
        for g in step
    ]
    assert all(bool(torch.isfinite(g).all()) for g in kept)
    fc1 = snap.layers["fc1"]
    sumsq = sum(float(g.double().pow(2).sum()) for g in kept)
    assert fc1.output_grad_norm == pytest.approx((sumsq / (steps - skipped)) ** 0.5, rel=1e-5)
    assert fc1.output_grad_abs_max == max(float(g.abs().max()) for g in kept)
    assert fc1.output_grad_inf_count == fc1.output_grad_nan_count == 0


def test_fp16_forward_overflow_is_an_inf_at_the_layer_that_overflowed():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()  # the ReLU outputs 4.0 for an input of ones
        model[2].weight.fill_(3e4)  # 4 * 4.0 * 3e4 > 65504: fp16 overflows here
    monitor = actmon.watch(model, sample_every=1, log_every=1, strict=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(torch.ones(2, 4))
    snap = monitor.step()
    monitor.close()
    assert snap is not None
    assert out.dtype == torch.float16
    assert bool(torch.isinf(out).any())
    assert snap.layers["0"].posinf_count == 0
    assert snap.layers["2"].posinf_count + snap.layers["2"].neginf_count == int(
        torch.isinf(out).sum()
    )
    assert snap.first_nonfinite is not None
    assert snap.first_nonfinite.layer == "2"


def test_scaler_without_optimizer_is_refused():
    with pytest.raises(actmon.ConfigError, match="needs the optimizer"):
        actmon.watch(Net(), scaler=torch.amp.GradScaler("cpu"))


def test_loss_scale_is_the_scalers_at_each_windows_end():
    """``Snapshot.loss_scale`` (and ``actmon_loss_scale``) follow the GradScaler: halved at an
    overflowed step, grown after ``growth_interval`` clean ones."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    monitor = actmon.watch(model, opt, scaler=scaler, log_every=2, sample_every=1)
    expected = []
    for step in range(6):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        if step == 1:
            loss = loss * float("inf")  # an overflowed backward: the scaler skips and halves
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        monitor.step(loss=loss)
        if step % 2 == 1:
            expected.append(scaler.get_scale())
    monitor.close()
    assert expected == [512.0, 512.0, 1024.0]  # halved at step 1, grown after steps 2-4
    assert [s.loss_scale for s in monitor.history] == expected
    assert [s.amp_skipped_steps for s in monitor.history] == [1, 0, 0]
    plain = Net()
    with actmon.watch(plain, log_every=1, sinks={"store": {"enabled": False}}) as without:
        plain(torch.randn(2, 16)).sum().backward()
        without.step(loss=1.0)
    assert without.history[-1].loss_scale is None  # no scaler: no loss scale
