"""End-to-end: the monitor's window statistics against plain torch on the same tensors."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import actmon
from actmon import histogram
from actmon.errors import HookError, MonitorStateError
from tests.conftest import Capture, reference_raw_hist, reference_stats


def mlp_with_dead_units(dead: int = 5) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].bias[:dead] = -100.0  # these ReLU units can never fire
    return model


def train(model, monitor, steps, opt=None, batch=16, loss_hook=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    snaps = []
    for step in range(1, steps + 1):
        x = torch.randn(batch, 20)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        snap = monitor.step(loss=loss)
        if snap is not None:
            snaps.append(snap)
    return snaps


def test_window_statistics_equal_plain_torch():
    model = mlp_with_dead_units(dead=5)
    cap = Capture(model, ["0", "1"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = actmon.watch(model, optimizer=opt, log_every=10, sample_every=1, strict=True)
    windows = []
    for _ in range(2):
        snaps = train(model, monitor, 10, opt)
        windows.append(({k: list(v) for k, v in cap.outputs.items()}, snaps[-1]))
        cap.reset()
    monitor.close()
    for outputs, snap in windows:
        relu = snap.layers["1"]
        ref = reference_stats(outputs["1"], unit_axis=-1)
        assert relu.count == ref["count"] == 10 * 16 * 32
        assert relu.calls == 10
        assert relu.mean == pytest.approx(ref["mean"], rel=1e-5)
        assert relu.std == pytest.approx(ref["std"], rel=1e-5)
        assert relu.min == ref["min"] == 0.0
        assert relu.max == pytest.approx(ref["max"], rel=0, abs=0)
        assert relu.zero_fraction == ref["zeros"] / ref["count"]
        assert relu.dead_units == ref["dead_units"] == 5
        assert relu.dead_fraction == 5 / 32
        assert relu.dead_fraction_batch == pytest.approx(ref["batch_dead"] / 32)
        assert relu.nan_count == relu.posinf_count == relu.neginf_count == 0
        lin = snap.layers["0"]
        ref0 = reference_stats(outputs["0"])
        assert lin.min == ref0["min"]
        assert lin.max == ref0["max"]
        assert lin.dead_fraction is None  # pre-activations have no dead units
        expected_edges, expected_counts = histogram.symlog_view(
            reference_raw_hist(outputs["0"]), -24, 24, 4
        )
        np.testing.assert_array_equal(lin.hist_edges, expected_edges)
        np.testing.assert_array_equal(lin.hist_counts, expected_counts)
    assert windows[0][1].window == (1, 10)
    assert windows[1][1].window == (11, 20)


def test_two_windows_merge_to_the_concatenated_histogram():
    model = mlp_with_dead_units()
    cap = Capture(model, ["0"])
    monitor = actmon.watch(model, log_every=5, sample_every=1)
    snaps = train(model, monitor, 10)
    monitor.close()
    merged = snaps[0].layers["0"].hist_counts + snaps[1].layers["0"].hist_counts
    _, expected = histogram.symlog_view(reference_raw_hist(cap.outputs["0"]), -24, 24, 4)
    np.testing.assert_array_equal(merged, expected)


def test_sampling_takes_stats_on_every_nth_step():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, log_every=10, sample_every=4)
    snaps = train(model, monitor, 20)
    monitor.close()
    # The schedule restarts with each window: its first step, then every 4th step of it.
    assert snaps[0].sampled_steps == (1, 5, 9)
    assert snaps[1].sampled_steps == (11, 15, 19)
    assert snaps[1].layers["1"].calls == 3
    assert len(snaps[0].losses) == 10  # the loss is recorded on every step regardless


def test_every_window_holds_every_layer_when_sampling_is_rarer_than_windows():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, optimizer=None, log_every=5, sample_every=10)
    snaps = train(model, monitor, 20)
    monitor.close()
    assert [s.sampled_steps for s in snaps] == [(1,), (6,), (11,), (16,)]
    names = [name for name, _ in model.named_modules() if name]
    for snap in snaps:
        assert list(snap.layers) == names
        assert all(
            layer.calls == 1 and layer.as_of_step == snap.step for layer in snap.layers.values()
        )
        assert snap.loss is not None
        assert snap.grad_norm_total is not None


def test_an_early_flush_starts_a_new_window_on_a_sampled_step():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, optimizer=None, log_every=10, sample_every=10)
    first = train(model, monitor, 3)
    assert first == []
    early = monitor.flush()
    assert early is not None
    assert early.sampled_steps == (1,)
    snaps = train(model, monitor, 10)
    monitor.close()
    assert snaps[0].window == (4, 13)
    assert snaps[0].sampled_steps == (4,)


def test_a_layer_that_did_not_run_is_carried_with_the_step_it_describes():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(20, 4)
            self.b = nn.Linear(4, 2)
            self.use_b = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) if self.use_b else h[:, :2]

    model = Branchy()
    monitor = actmon.watch(model, optimizer=None, log_every=2, sample_every=1)
    first = train(model, monitor, 2)[0]
    model.use_b = False
    second = train(model, monitor, 2)[0]
    monitor.close()
    assert list(second.layers) == ["a", "b"]
    assert second.layers["a"].as_of_step == 4
    assert not second.layers["a"].stale(4)
    assert second.layers["b"] == first.layers["b"]
    assert second.layers["b"].stale(4)
    assert second.layers["b"].as_of_step == 2
    assert set(second.fresh_layers()) == {"a"}


class NaNAt(nn.Module):
    """Injects 3 NaN, 2 +Inf and 1 -Inf into its output at one step."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.step:
            x = x.clone()
            flat = x.view(-1)
            flat[:3] = float("nan")
            flat[3:5] = float("inf")
            flat[5] = float("-inf")
        return x


def test_first_nonfinite_offender_and_exact_counts():
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), NaNAt(step=7), nn.Linear(16, 4))
    # The window ends at the poisoned step: after it the NaN gradients poison every weight.
    monitor = actmon.watch(model, log_every=7, sample_every=1)
    snaps = train(model, monitor, 7)
    monitor.close()
    snap = snaps[0]
    assert snap.first_nonfinite == actmon.NonFinite(
        step=7, source="activation", layer="2", confirmed_step=7
    )
    injected = snap.layers["2"]
    assert (injected.nan_count, injected.posinf_count, injected.neginf_count) == (3, 2, 1)
    assert snap.layers["1"].nan_count == 0  # upstream of the offender, still clean at step 7
    assert monitor.first_nonfinite == snap.first_nonfinite


def test_sentinel_catches_a_nonfinite_loss_on_an_unsampled_step_then_escalates():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, log_every=10, sample_every=5)

    def poison(step, loss):
        return loss * float("nan") if step == 3 else loss

    snaps = train(model, monitor, 30, loss_hook=poison)
    monitor.close()
    assert snaps[0].first_nonfinite == actmon.NonFinite(step=3, source="loss", layer=None)
    assert math.isnan(snaps[0].losses[2])
    assert snaps[0].sampled_steps == (1, 6)  # 1, 6, 11, ... until the escalation
    assert snaps[1].sampled_steps == tuple(range(11, 21))  # escalated to every step
    # The loss turned finite again before any layer was named: back to the schedule.
    assert snaps[1].first_nonfinite is None
    assert snaps[2].sampled_steps == (21, 26)
    assert monitor.first_nonfinite == actmon.NonFinite(step=3, source="loss", layer=None)


def test_escalation_names_the_layer_everywhere_and_logs_once_each_way(caplog, tmp_path):
    """A NaN weight update at an unsampled step: the loss shows it first; the next sampled
    step names the first offending layer, and the alert, Snapshot and store say so."""
    model = mlp_with_dead_units()
    store = tmp_path / "nan.db"
    monitor = actmon.watch(
        model,
        run_name="nan",
        log_every=10,
        sample_every=10,
        sinks={"store": {"path": str(store)}},
    )

    def poison(step, loss):
        if step == 4:  # after step 4's update every weight of layer 0 is NaN
            with torch.no_grad():
                model[0].weight.fill_(float("nan"))
        return loss

    with caplog.at_level(logging.WARNING, logger="actmon"):
        snaps = train(model, monitor, 40, loss_hook=poison)
    monitor.close()
    first = actmon.NonFinite(step=5, source="loss", layer="0", confirmed_step=11)
    assert snaps[0].first_nonfinite == actmon.NonFinite(step=5, source="loss", layer=None)
    assert snaps[1].first_nonfinite == first
    assert monitor.first_nonfinite == first
    assert snaps[1].sampled_steps == (11, 12, 13, 14, 15, 16, 17, 18, 19, 20)
    assert snaps[2].sampled_steps == (21,)  # attributed: the schedule is back
    nonfinite = [a for a in monitor.alerts if a.rule == "nonfinite"]
    assert [(a.layer, a.first_seen, a.step, a.state) for a in nonfinite] == [
        (None, 5, 5, "firing"),
        ("0", 5, 11, "firing"),
    ]
    active = [a for a in monitor.active_alerts if a.rule == "nonfinite"]
    assert active == [nonfinite[1]]  # the run-level alert is not listed twice
    messages = [r.getMessage() for r in caplog.records]
    assert sum("sampling every step" in m for m in messages) == 1
    assert sum("the first non-finite layer is '0'" in m for m in messages) == 1
    with actmon.store.open(store) as db:
        stored = [(a.layer, a.first_seen, a.step) for a in db.alerts() if a.rule == "nonfinite"]
    assert stored == [(None, 5, 5), ("0", 5, 11)]


class SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(20, 12), nn.Linear(20, 12), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.a(x)) + self.act(self.b(x))


def test_a_module_called_twice_aggregates_both_calls():
    model = SharedReLU()
    cap = Capture(model, ["act"])
    monitor = actmon.watch(model, log_every=4, sample_every=1, strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        model(torch.randn(8, 20)).sum().backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    act = monitor.snapshot().layers["act"]
    ref = reference_stats(cap.outputs["act"], unit_axis=-1)
    assert act.calls == 8
    assert act.count == ref["count"] == 8 * 8 * 12
    assert act.mean == pytest.approx(ref["mean"], rel=1e-5)
    assert act.dead_units == ref["dead_units"]


def _hook_state(model: nn.Module, opt: torch.optim.Optimizer | None):
    state = []
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs",
        ):
            state.append(dict(getattr(module, attr)))
    for p in model.parameters():
        hooks = p._post_accumulate_grad_hooks
        state.append(None if hooks is None else dict(hooks))
        state.append(None if p._backward_hooks is None else dict(p._backward_hooks))
    if opt is not None:
        state.append(dict(opt._optimizer_step_pre_hooks))
        state.append(dict(opt._optimizer_step_post_hooks))
    return state


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_close_leaves_every_hook_dict_as_it_was(with_optimizer):
    model = mlp_with_dead_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _hook_state(model, opt)
    monitor = actmon.watch(model, optimizer=opt if with_optimizer else None, log_every=3)
    assert _hook_state(model, opt) != before
    train(model, monitor, 5, opt)
    monitor.close()
    monitor.close()  # idempotent
    assert _hook_state(model, opt) == before


def test_layers_list_names_kinds_axes_and_units():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.GELU(),
        nn.Linear(10, 2),
        nn.Softmax(dim=-1),
    )
    monitor = actmon.watch(model, exclude=["3"])
    model(torch.randn(2, 3, 8, 8))
    monitor.close()
    layers = {info.name: info for info in monitor.layers}
    assert "3" not in layers
    assert [
        (layers[n].kind.value, layers[n].unit_axis, layers[n].units)
        for n in ("0", "1", "2", "4", "5", "6", "7")
    ] == [
        ("linear", 1, 8),
        ("norm", 1, 8),
        ("relu", 1, 8),
        ("linear", -1, 10),
        ("smooth_gated", -1, 10),
        ("linear", -1, 2),
        ("softmax", -1, 2),
    ]


def test_unit_axis_override():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    monitor = actmon.watch(model, unit_axis={"1": 1}, log_every=1, strict=True)
    model(torch.randn(4, 3, 6))
    monitor.step()
    monitor.close()
    assert monitor.layers[1].unit_axis == 1
    assert monitor.snapshot().layers["1"].units == 3


def test_gradient_norms_equal_plain_torch():
    model = mlp_with_dead_units()
    cap = Capture(model, ["0"], grads=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, updates, weights = [], [], []

    def before_step(optimizer, args, kwargs):
        grads.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def after_step(optimizer, args, kwargs):
        updates.append(
            {n: (p.detach() - weights[-1][n]).norm().item() for n, p in model.named_parameters()}
        )

    opt.register_step_pre_hook(before_step)
    opt.register_step_post_hook(after_step)
    monitor = actmon.watch(model, optimizer=opt, log_every=4, sample_every=1, strict=True)
    snaps = train(model, monitor, 4, opt)
    monitor.close()
    snap = snaps[0]
    out_sq = [float(g.double().pow(2).sum()) for g in cap.grads["0"]]
    assert snap.layers["0"].output_grad_norm == pytest.approx(math.sqrt(np.mean(out_sq)), rel=1e-5)
    assert snap.layers["0"].output_grad_abs_max == max(float(g.abs().max()) for g in cap.grads["0"])
    layer_sq = [g["0.weight"] ** 2 + g["0.bias"] ** 2 for g in grads]
    assert snap.layers["0"].grad_norm == pytest.approx(math.sqrt(np.mean(layer_sq)), rel=1e-5)
    assert snap.params["2.weight"].grad_norm == pytest.approx(
        math.sqrt(np.mean([g["2.weight"] ** 2 for g in grads])), rel=1e-5
    )
    # Update ratio: measured on the window's first step only.
    w0 = weights[0]
    expected = math.hypot(updates[0]["0.weight"], updates[0]["0.bias"]) / math.sqrt(
        np.mean(
            [
                sum(float(w[n].double().pow(2).sum()) for n in ("0.weight", "0.bias"))
                for w in weights
            ]
        )
    )
    assert snap.layers["0"].update_ratio == pytest.approx(expected, rel=1e-5)
    assert w0  # weights were captured
    totals = [math.sqrt(sum(v**2 for v in g.values())) for g in grads]
    assert snap.grad_norms_total == pytest.approx(totals, rel=1e-5)


def test_parameter_norms_without_optimizer_after_accumulation():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, log_every=2, sample_every=1, strict=True)
    expected = []
    for _ in range(2):
        for _ in range(3):  # three micro-batches accumulate into one step
            model(torch.randn(4, 20)).pow(2).mean().backward()
        expected.append(model[2].weight.grad.norm().item())
        for p in model.parameters():
            p.grad = None
        monitor.step()
    monitor.close()
    got = monitor.snapshot().params["2.weight"].grad_norm
    assert got == pytest.approx(math.sqrt(np.mean(np.square(expected))), rel=1e-5)
    assert monitor.snapshot().layers["1"].calls == 6  # activations cover every micro-batch


def test_no_grad_forwards_are_not_recorded():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, log_every=1, sample_every=1)
    with torch.no_grad():
        model(torch.randn(4, 20))
    model(torch.randn(4, 20)).sum().backward()
    monitor.step()
    monitor.close()
    assert monitor.snapshot().layers["1"].calls == 1


def test_close_flushes_the_partial_window_and_context_manager():
    model = mlp_with_dead_units()
    with actmon.watch(model, log_every=10, sample_every=1) as monitor:
        train(model, monitor, 13)
    assert [s.window for s in monitor.history] == [(1, 10), (11, 13)]


def test_watch_twice_is_a_clear_error():
    model = mlp_with_dead_units()
    monitor = actmon.watch(model)
    with pytest.raises(MonitorStateError, match="already watched by an open monitor"):
        actmon.watch(model)
    monitor.close()
    actmon.watch(model).close()  # after close it can be watched again


class SparseOutput(nn.Module):
    """An output no kernel takes (int outputs are skipped quietly: tests/test_legal_models.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to_sparse()


class Passthrough(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.idx = nn.Linear(20, 4), SparseOutput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.idx(x)
        return self.lin(x)


def test_hook_failure_is_contained_counted_and_logged_once(caplog):
    model = Passthrough()
    monitor = actmon.watch(model, log_every=2, sample_every=1)
    with caplog.at_level(logging.WARNING, logger="actmon"):
        for _ in range(4):
            model(torch.randn(3, 20)).sum().backward()
            monitor.step()
    monitor.close()
    assert monitor.errors == {"idx": 1}
    assert monitor.internal_errors_total == 1
    messages = [r.getMessage() for r in caplog.records if "idx" in r.getMessage()]
    assert len(messages) == 1
    assert "layout torch.sparse_coo" in messages[0]
    assert monitor.snapshot().layers["lin"].calls == 2  # the other layer kept going


def test_strict_raises_hook_error():
    model = Passthrough()
    monitor = actmon.watch(model, strict=True)
    with pytest.raises(HookError, match=r"layer 'idx' output has layout torch.sparse_coo"):
        model(torch.randn(3, 20))
    monitor.close()


def test_changing_unit_count_is_contained():
    act = nn.ReLU()
    model = nn.ModuleDict({"act": act})
    monitor = actmon.watch(model, log_every=1, sample_every=1)
    act(torch.randn(4, 8))
    act(torch.randn(4, 6))
    monitor.step()
    monitor.close()
    assert monitor.errors == {"act": 1}
    assert monitor.snapshot().layers["act"].calls == 1


def test_gradient_accumulation_with_an_optimizer_is_one_step_over_all_micro_batches():
    model = mlp_with_dead_units()
    cap = Capture(model, ["1"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = actmon.watch(model, opt, log_every=2, sample_every=1, strict=True)
    accumulated = []
    for _ in range(2):
        for _ in range(4):  # four micro-batches per optimizer step
            (model(torch.randn(4, 20)).pow(2).mean() / 4).backward()
        accumulated.append(float(model[2].weight.grad.double().norm()))
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    snap = monitor.snapshot()
    assert snap.window == (1, 2)  # two optimizer steps, not eight micro-batches
    relu = snap.layers["1"]
    ref = reference_stats(cap.outputs["1"], unit_axis=-1)
    assert relu.calls == 8
    assert relu.count == ref["count"] == 8 * 4 * 32
    assert relu.mean == pytest.approx(ref["mean"], rel=1e-6)
    assert relu.dead_units == ref["dead_units"]
    got = snap.params["2.weight"].grad_norm  # taken once, on the accumulated gradient
    assert got == pytest.approx(math.sqrt(np.mean(np.square(accumulated))), rel=1e-6)


def test_after_a_fault_nan_figures_are_unknown_not_zero():
    """All-NaN ReLU outputs and NaN weights: no dead fraction of 0, no update ratio of 0, and
    so no update_ratio_low ("the learning rate is too low") on NaN weights."""
    model = mlp_with_dead_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = actmon.watch(model, optimizer=opt, log_every=10, sample_every=1)

    def poison(step, loss):
        if step == 5:
            with torch.no_grad():
                model[0].weight.fill_(float("nan"))
        return loss

    snaps = train(model, monitor, 220, opt=opt, loss_hook=poison)
    monitor.close()
    relu = snaps[-1].layers["1"]
    assert relu.nan_count == relu.count  # every output NaN
    assert relu.nonfinite_units == 32
    assert math.isnan(relu.dead_fraction)
    assert math.isnan(snaps[-1].layers["0"].update_ratio)
    fired = {a.rule for a in monitor.alerts}
    assert "update_ratio_low" not in fired
    assert not {"dead_units", "dead_units_critical", "dead_units_concerning"} & fired
    assert "nonfinite" in fired


def test_dead_fraction_leaves_out_units_that_output_nan():
    model = mlp_with_dead_units(dead=5)
    monitor = actmon.watch(model, optimizer=None, log_every=1, sample_every=1)
    with torch.no_grad():
        model[0].weight[30:].fill_(float("nan"))  # units 30 and 31 output NaN
    x = torch.randn(16, 20)
    model(x).sum().backward()
    snap = monitor.step()
    monitor.close()
    relu = snap.layers["1"]
    expected_dead = int((torch.relu(model[0](x))[:, :30] <= 0).all(dim=0).sum())
    assert relu.nonfinite_units == 2
    assert relu.dead_units == expected_dead
    assert relu.dead_fraction == expected_dead / 30


def test_every_bad_loss_is_counted_and_windows_keep_their_boundaries(caplog):
    model = mlp_with_dead_units()
    monitor = actmon.watch(model, optimizer=None, log_every=5, sample_every=5)
    losses = iter(
        [torch.ones(3), "bad", torch.ones(3), None, torch.tensor([]), 1.5, np.float32(2.0)]
        + [torch.tensor(0.5)] * 3
    )
    snaps = []
    with caplog.at_level(logging.WARNING, logger="actmon"):
        for _ in range(10):
            model(torch.randn(4, 20)).sum().backward()
            snap = monitor.step(loss=next(losses))
            if snap is not None:
                snaps.append(snap)
    monitor.close()
    assert [s.window for s in snaps] == [(1, 5), (6, 10)]
    # (3,) tensors: their mean; "bad" and the empty tensor: no loss for that step.
    assert snaps[0].losses[0] == 1.0
    assert snaps[0].losses[2] == 1.0
    assert math.isnan(snaps[0].losses[1])
    assert math.isnan(snaps[0].losses[3])
    assert math.isnan(snaps[0].losses[4])
    assert snaps[1].losses == (1.5, 2.0, 0.5, 0.5, 0.5)
    assert monitor.errors == {"(step) loss": 4}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("its mean is recorded" in m for m in messages) == 1
    assert sum("got str 'bad'" in m for m in messages) == 1
    assert sum("an empty tensor" in m for m in messages) == 1
