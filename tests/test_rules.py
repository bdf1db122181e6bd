"""Alert rules: engine semantics, validation, actions, the default pack on real failures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import actmon
from actmon import store
from tests.helpers import wait_for
from tests.test_models import conv_net, make_tiny_gpt2
from tests.test_monitor import NaNAt

NO_STORE = {"store": {"enabled": False}}


def _rule(**kw):
    base = {"name": "r", "metric": "dead_fraction", "op": ">", "threshold": 0.3}
    return {**base, **kw}


class Dial(nn.Module):
    """A ReLU layer whose dead share the test sets per step (units < k get -inf bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(4, 10), nn.ReLU()
        self.dead = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).abs() + 1.0
        h = torch.cat([h[:, : 10 - self.dead], -h[:, 10 - self.dead :]], dim=1)
        return self.act(h)


def _dial_run(dead_per_window, rules, log_every=10, **kw):
    model = Dial()
    monitor = actmon.watch(
        model, log_every=log_every, sample_every=1, rules=rules, checks=False, sinks=NO_STORE, **kw
    )
    for dead in dead_per_window:
        model.dead = dead
        for _ in range(log_every):
            model(torch.randn(2, 4)).sum().backward()
            monitor.step(loss=torch.tensor(1.0))
    monitor.close()
    return monitor


def _events(monitor):
    return [(a.rule, a.layer, a.state, a.step, a.first_seen) for a in monitor.alerts]


def test_for_steps_dedup_resolution_and_cooldown():
    # dead share per window of 10 steps: holds (> 0.3) in windows 1-3, 5-6, 8-10
    dead = [5, 5, 5, 0, 5, 5, 0, 5, 5, 5]
    mon = _dial_run(dead, [_rule(for_steps=20, cooldown_steps=30)])
    assert _events(mon) == [
        ("r", "act", "firing", 20, 1),  # two windows cover 20 steps
        ("r", "act", "resolved", 40, 1),
        # windows 5-6 would fire at step 60, but the cooldown lasts until step 70
        ("r", "act", "firing", 90, 71),
    ]
    assert mon.active_alerts == [mon.alerts[-1]]  # a list of Alerts: the one firing now
    assert [(a.rule, a.layer, a.state) for a in mon.active_alerts] == [("r", "act", "firing")]


def test_warmup_and_immediate_rules():
    mon = _dial_run([5, 5, 5], [_rule(warmup_steps=25)])
    assert _events(mon) == [("r", "act", "firing", 30, 21)]


def test_actions_callback_stop_and_raise():
    seen = []
    model = Dial()
    model.dead = 6
    monitor = actmon.watch(
        model,
        log_every=2,
        sample_every=1,
        checks=False,
        sinks=NO_STORE,
        rules=[
            _rule(name="cb", actions=["callback", "stop"]),
            _rule(name="boom", actions=["raise"], for_steps=4),
        ],
    )
    monitor.on_alert(seen.append)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        monitor.step()
    wait_for(lambda: seen, timeout=10, what="the callback")  # callbacks run on their own thread
    assert [a.rule for a in seen] == ["cb"]
    assert monitor.should_stop
    model(torch.randn(2, 4)).sum().backward()
    monitor.step()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(
        actmon.AlertError,
        match=r"\[warning\] boom on layer 'act' at step 4: dead_fraction is 0.6, above 0.3,"
        r" since step 1\.",
    ):
        monitor.step()
    monitor.close()


def test_rule_validation_names_the_rule():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(
        actmon.ConfigError,
        match=r"field 'rules.0.metric': got 'deadness'; "
        r"unknown metric 'deadness'",
    ):
        actmon.watch(model, rules=[_rule(metric="deadness")], sinks=NO_STORE)
    with pytest.raises(
        actmon.ConfigError,
        match=r"rule 'r': its layer selector \(globs "
        r"\['enc\*'\], kinds default\) matches no monitored layer",
    ):
        actmon.watch(model, rules=[_rule(layers={"globs": ["enc*"]})], sinks=NO_STORE)
    with pytest.raises(
        actmon.ConfigError,
        match=r"rule 'r': metric 'quantile_0.3' is not a "
        r"configured quantile",
    ):
        actmon.watch(model, rules=[_rule(metric="quantile_0.3")], sinks=NO_STORE)
    assert all(not m._forward_hooks for m in model.modules())  # a failed watch leaves no hook


# ---- the default pack on real runs -----------------------------------------------------------
def _digits(lr: float, steps: int, init_kaiming: bool = True, optimizer: str = "sgd"):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    if init_kaiming:
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    gen = torch.Generator().manual_seed(0)
    monitor = actmon.watch(model, optimizer=opt, sinks=NO_STORE)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss=loss)
    monitor.close()
    return monitor


def test_healthy_digits_mlp_fires_nothing():
    monitor = _digits(lr=1e-3, steps=300, optimizer="adam")
    # Nothing to act on; a layer in the 10-30% "concerning" dead band is an info record.
    assert [a for a in monitor.alerts if a.severity != "info"] == []
    assert {a.rule for a in monitor.alerts} <= {"dead_units_concerning"}


def test_healthy_conv_net_and_gpt2_fire_nothing():
    model = conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with actmon.watch(model, optimizer=opt, sinks=NO_STORE) as monitor:
        for _ in range(40):
            x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    assert monitor.alerts == []
    gpt = make_tiny_gpt2()
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
    with actmon.watch(gpt, optimizer=opt, sinks=NO_STORE) as monitor:
        for _ in range(40):
            ids = torch.randint(0, 100, (2, 16))
            loss = gpt(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    assert monitor.alerts == []


def _first_sustained(history, layer, threshold, for_steps):
    """Independently: the window end at which > threshold has held over >= for_steps steps."""
    start = None
    for snap in history:
        stats = snap.layers.get(layer)
        if stats is None:
            continue
        if stats.dead_fraction > threshold:
            start = snap.window[0] if start is None else start
            if snap.window[1] - start + 1 >= for_steps:
                return snap.window[1]
        else:
            start = None
    return None


def test_too_high_learning_rate_kills_relus_and_fires_dead_units():
    monitor = _digits(lr=1.0, steps=300, init_kaiming=False)
    fired = {(a.rule, a.layer): a.step for a in monitor.alerts if a.state == "firing"}
    history = list(monitor.history)
    expected = _first_sustained(history, "1", 0.5, 100)
    assert expected is not None
    assert fired[("dead_units_critical", "1")] == expected
    assert fired[("dead_units", "1")] == _first_sustained(history, "1", 0.3, 100)
    assert all(a.layer in ("1", "3") for a in monitor.alerts if a.rule.startswith("dead_units"))


def test_deep_sigmoid_stack_fires_at_attach():
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 2))
    with actmon.watch(model, log_every=2, sinks=NO_STORE) as monitor:
        model(torch.randn(4, 16)).sum().backward()
        monitor.step()
    stack = [a for a in monitor.alerts if a.rule == "saturating_hidden_stack"]
    assert [(a.layer, a.step, a.value) for a in stack] == [("9", 0, 5)]


def test_nan_layer_fires_nonfinite_naming_layer_and_step(tmp_path):
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), NaNAt(step=7), nn.Linear(16, 4))
    path = tmp_path / "run.db"
    with actmon.watch(
        model, log_every=5, sample_every=1, sinks={"store": {"path": str(path)}}
    ) as monitor:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(10):
            loss = model(torch.randn(4, 20)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    nonfinite = [a for a in monitor.alerts if a.rule == "nonfinite"]
    assert [(a.layer, a.step, a.severity, a.state) for a in nonfinite] == [
        ("2", 7, "critical", "firing")
    ]
    with store.open(path) as db:
        stored = [a for a in db.alerts() if a.rule == "nonfinite"]
        assert [(a.layer, a.step, a.state) for a in stored] == [("2", 7, "firing")]


def test_softmax_before_cross_entropy():
    model = nn.Sequential(nn.Linear(8, 5), nn.Softmax(dim=1))
    criterion = nn.CrossEntropyLoss()
    with actmon.watch(model, loss_fn=criterion, log_every=2, sinks=NO_STORE) as monitor:
        for _ in range(2):
            criterion(model(torch.randn(4, 8)), torch.randint(0, 5, (4,))).backward()
            monitor.step()
    double = [
        (a.rule, a.layer, a.step, a.severity) for a in monitor.alerts if a.rule == "double_softmax"
    ]
    assert double == [("double_softmax", None, 1, "critical")]
    assert not criterion._forward_pre_hooks  # the check's hook is gone after close
    # Without the loss module, the model's last layer gives it away at attach.
    with actmon.watch(model, log_every=1, sinks=NO_STORE) as monitor:
        model(torch.randn(4, 8)).sum().backward()
        monitor.step()
    assert [(a.rule, a.layer, a.step) for a in monitor.alerts] == [("double_softmax", "1", 0)]


def test_logits_into_cross_entropy_fire_nothing():
    model = nn.Sequential(nn.Linear(8, 5))
    criterion = nn.CrossEntropyLoss()
    with actmon.watch(model, loss_fn=criterion, log_every=1, sinks=NO_STORE) as monitor:
        criterion(model(torch.randn(4, 8)), torch.randint(0, 5, (4,))).backward()
        monitor.step()
    assert monitor.alerts == []


def test_init_mismatch():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        model[0].weight.normal_(0, 3.0)  # Kaiming for ReLU would be sqrt(2/64) = 0.177
    monitor = actmon.watch(model, log_every=1, sinks=NO_STORE)
    model(torch.randn(4, 64)).sum().backward()
    monitor.step()
    monitor.close()
    init = [a for a in monitor.alerts if a.rule == "init_mismatch"]
    assert [(a.layer, a.step, a.op) for a in init] == [("0", 0, ">")]
    assert init[0].value == pytest.approx(
        float(model[0].weight.detach().std()) / (2 / 64) ** 0.5, rel=1e-6
    )


def test_a_confident_classifier_fires_nothing():
    """An output softmax near one-hot is a classifier doing its job, not a collapse."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = torch.randint(0, 3, (512,), generator=gen)
    x = centres[y] + 0.3 * torch.randn(512, 4, generator=gen)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 3), nn.Softmax(dim=-1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    # checks=False: the attach-time double_softmax check warns about a final Softmax layer
    # (log_softmax is the stabler form); this test is about the window rules.
    with actmon.watch(model, optimizer=opt, sinks=NO_STORE, checks=False) as monitor:
        for step in range(300):
            batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
            probs = model(x[batch])
            loss = nn.functional.nll_loss(torch.log(probs + 1e-9), y[batch])
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    assert monitor.snapshot().layers["3"].softmax_max_prob > 0.98  # confident: near one-hot
    assert (model(x).argmax(dim=1) == y).float().mean() == 1.0
    assert monitor.alerts == []


def test_a_steadily_rising_loss_fires_loss_divergence():
    model = nn.Sequential(nn.Linear(4, 4))
    with actmon.watch(model, sinks=NO_STORE) as monitor:
        for step in range(400):
            model(torch.randn(2, 4)).sum().backward()
            monitor.step(loss=1.0 * 1.005**step)  # +0.5% a step, never NaN
    fired = [(a.rule, a.severity, a.state) for a in monitor.alerts]
    assert ("loss_divergence", "critical", "firing") in fired
    first = next(a for a in monitor.alerts if a.rule == "loss_divergence")
    assert first.value > 2.0
    assert first.step - first.first_seen + 1 >= 60  # held for three windows


def test_a_noisy_flat_loss_does_not_fire_loss_divergence():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    with actmon.watch(model, sinks=NO_STORE) as monitor:
        for _ in range(400):
            model(torch.randn(2, 4)).sum().backward()
            monitor.step(loss=float(1.0 + 0.5 * torch.rand(1, generator=gen)))
    assert [a.rule for a in monitor.alerts] == []


def _event(**kwargs: object) -> actmon.Alert:
    base: dict[str, object] = {
        "rule": "dead_units",
        "layer": "fc1",
        "severity": "warning",
        "metric": "dead_fraction",
        "value": 0.4219,
        "op": ">",
        "threshold": 0.3,
        "step": 200,
        "first_seen": 101,
        "summary": "over 30% of this layer's units output exactly 0",
        "runbook": "Lower the learning rate",
    }
    return actmon.Alert(**{**base, **kwargs})  # type: ignore[arg-type]


def test_alert_messages_read_as_sentences():
    assert _event().message() == (
        "[warning] dead_units on layer 'fc1' at step 200: dead_fraction is 0.4219, above 0.3,"
        " since step 101. Over 30% of this layer's units output exactly 0. Runbook: Lower the"
        " learning rate."
    )
    # A condition first seen in the window of this event: no "since step N (step N)".
    nan = _event(
        rule="nonfinite",
        layer="0",
        severity="critical",
        metric="nonfinite_count",
        value=395,
        threshold=0,
        step=120,
        first_seen=120,
        summary="",
        runbook="",
    )
    assert (
        nan.message()
        == "[critical] nonfinite on layer '0' at step 120: nonfinite_count is 395, above 0."
    )
    resolved = replace(nan, state="resolved", value=0.0, step=150)
    assert resolved.message() == (
        "[critical] nonfinite on layer '0' resolved at step 150: nonfinite_count is 0, no longer"
        " above 0."
    )
    assert _event().short() == "dead_units (warning) on layer 'fc1', firing since step 200"
    assert resolved.short() == "nonfinite (critical) on layer '0', resolved at step 150"
    low = _event(
        rule="vanishing",
        layer=None,
        metric="grad_norm_depth_ratio",
        op="<",
        threshold=1e-4,
        value=2.5e-12,
        summary="",
        runbook="",
    )
    assert low.message() == (
        "[warning] vanishing at step 200: grad_norm_depth_ratio is 2.5e-12, below 0.0001, since"
        " step 101."
    )


def test_model_check_messages_say_the_finding_not_a_flag():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(dim=1))
    criterion = nn.CrossEntropyLoss()
    with actmon.watch(model, loss_fn=criterion, log_every=1) as monitor:
        criterion(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        monitor.step()
    (alert,) = [a for a in monitor.alerts if a.rule == "double_softmax"]
    assert alert.message() == (
        "[critical] double_softmax at step 1: CrossEntropyLoss receives softmax probabilities"
        " (rows >= 0 summing to 1); it expects logits. Runbook: Remove the final"
        " softmax/sigmoid: the loss applies it itself."
    )
    deep = nn.Sequential(
        *(m for _ in range(4) for m in (nn.Linear(4, 4), nn.Tanh())), nn.Linear(4, 2)
    )
    with actmon.watch(deep, log_every=1) as monitor:
        deep(torch.randn(2, 4)).sum().backward()
        monitor.step()
    (stack,) = [a for a in monitor.alerts if a.rule == "saturating_hidden_stack"]
    assert stack.message() == (
        "[warning] saturating_hidden_stack on layer '7' at attach: 4 sigmoid/tanh hidden layers"
        " (1, 3, 5, 7): deep saturating stacks train slowly or not at all. Runbook: Use ReLU/GELU"
        " hidden activations or add normalisation."
    )
