"""Functional activations (F.relu, torch.sigmoid, F.softmax ... in a forward) are layers too."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actmon
from tests.conftest import reference_stats


class FunctionalNet(nn.Module):
    """An MLP written with functional activations, the way much research code is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = torch.sigmoid(self.fc2(h))
        return F.log_softmax(self.out(h), dim=-1)


class ModuleNet(nn.Module):
    """The same network with activation modules: the reference for FunctionalNet."""

    def __init__(self, functional: FunctionalNet) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = (
            copy.deepcopy(m) for m in (functional.fc1, functional.fc2, functional.out)
        )
        self.relu, self.sigmoid, self.log_softmax = nn.ReLU(), nn.Sigmoid(), nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_softmax(self.out(self.sigmoid(self.fc2(self.relu(self.fc1(x))))))


def _train(model: nn.Module, batches, **overrides) -> actmon.Monitor:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = actmon.watch(
        model, opt, sample_every=1, log_every=len(batches), strict=True, **overrides
    )
    for x, y in batches:
        loss = F.nll_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    monitor.close()
    return monitor


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(n)]


def _dying_fc1(model: FunctionalNet) -> None:
    with torch.no_grad():  # units 0..5 can never be > 0 on these inputs
        model.fc1.weight[:6] = 0.0
        model.fc1.bias[:6] = -1.0


def test_functional_layers_are_named_by_module_function_and_call_in_forward_order():
    monitor = _train(FunctionalNet(), _batches(1))
    assert [info.name for info in monitor.layers] == [
        "fc1",
        "(root).relu#0",
        "fc2",
        "(root).sigmoid#0",
        "out",
        "(root).log_softmax#0",
    ]
    kinds = {info.name: info.kind for info in monitor.layers}
    assert kinds["(root).relu#0"] is actmon.Kind.RELU
    assert kinds["(root).sigmoid#0"] is actmon.Kind.SIGMOID
    assert kinds["(root).log_softmax#0"] is actmon.Kind.SOFTMAX


def test_functional_relu_gets_the_same_statistics_as_an_nn_relu_module():
    functional = FunctionalNet()
    _dying_fc1(functional)
    modules = ModuleNet(functional)
    batches = _batches()
    outputs: list[torch.Tensor] = []
    modules.relu.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    got = _train(functional, batches).snapshot()
    want = _train(modules, batches).snapshot()
    assert got is not None
    assert want is not None
    pairs = {
        "(root).relu#0": "relu",
        "(root).sigmoid#0": "sigmoid",
        "(root).log_softmax#0": "log_softmax",
    }
    for fn_name, module_name in pairs.items():
        a, b = got.layers[fn_name], want.layers[module_name]
        assert (a.count, a.calls, a.units, a.zero_fraction) == (
            b.count,
            b.calls,
            b.units,
            b.zero_fraction,
        )
        assert (a.mean, a.std, a.min, a.max) == (b.mean, b.std, b.min, b.max)
        assert list(a.hist_counts) == list(b.hist_counts)
        assert a.output_grad_norm == pytest.approx(b.output_grad_norm, rel=1e-6)
    relu = got.layers["(root).relu#0"]
    ref = reference_stats(outputs, unit_axis=-1)
    assert relu.dead_units == ref["dead_units"] == 6
    assert relu.dead_fraction == 6 / 16
    assert relu.zero_fraction == ref["zeros"] / ref["count"]
    assert got.layers["(root).sigmoid#0"].saturation_fraction is not None
    assert got.layers["(root).log_softmax#0"].softmax_entropy == pytest.approx(
        want.layers["log_softmax"].softmax_entropy
    )


def test_dead_unit_rule_fires_on_a_functional_relu():
    model = FunctionalNet()
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(-1.0)  # every unit of the F.relu is dead
    alerts: list[actmon.Alert] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rules = [
        {"name": "dead", "metric": "dead_fraction", "op": ">", "threshold": 0.3},
        # A selector for functional layers is checked once they are found, not at watch().
        {
            "name": "dead_relu_site",
            "metric": "dead_fraction",
            "op": ">=",
            "threshold": 1.0,
            "layers": {"globs": ["*.relu#*"]},
        },
    ]
    monitor = actmon.watch(model, opt, sample_every=1, log_every=2, rules=rules)
    monitor.on_alert(alerts.append)
    for x, y in _batches(4):
        F.nll_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    fired = {(a.rule, a.layer) for a in alerts if a.state == "firing"}
    assert fired == {("dead", "(root).relu#0"), ("dead_relu_site", "(root).relu#0")}


class TwiceRelu(nn.Module):
    """Two F.relu calls in one forward, and a sub-block called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))
        self.act = nn.GELU()  # calls F.gelu internally: must not become "act.gelu#0" too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.block(x))
        b = F.relu(self.block(a) - 1.0)
        return self.act(a + b)


def test_calls_are_counted_per_forward_and_leaf_modules_are_not_counted_twice():
    model = TwiceRelu()
    x = torch.randn(5, 4)
    monitor = _train(model, [(x, torch.zeros(5, dtype=torch.long))] * 2)
    names = [info.name for info in monitor.layers]
    assert "(root).relu#0" in names
    assert "(root).relu#1" in names
    assert not any(name.startswith("act.") for name in names)
    snap = monitor.snapshot()
    assert snap is not None
    assert snap.layers["(root).relu#0"].calls == 2  # once per step, k restarts each forward
    assert snap.layers["(root).relu#1"].calls == 2
    assert snap.layers["(root).relu#1"].count == 2 * x.numel()


def test_functional_capture_can_be_switched_off_and_costs_nothing_unsampled():
    monitor = _train(FunctionalNet(), _batches(1), functional=False)
    assert [info.name for info in monitor.layers] == ["fc1", "fc2", "out"]
    # Unsampled steps: no functional layer appears, and no torch function mode is left on.
    model = FunctionalNet()
    seen_modes: list[int] = []
    model.fc2.register_forward_hook(
        lambda m, a, o: seen_modes.append(torch._C._len_torch_function_stack())
    )
    monitor = actmon.watch(model, sample_every=2, log_every=10, strict=True)
    for _ in range(2):
        model(torch.randn(2, 8))
        assert torch._C._len_torch_function_stack() == 0
        monitor.step()
    monitor.close()
    # Inside the leaf fc2 the mode is popped on the sampled step too; never on unsampled steps.
    assert seen_modes == [0, 0]
    assert "(root).relu#0" in {info.name for info in monitor.layers}


def test_an_exception_inside_forward_leaves_no_mode_behind():
    class Broken(FunctionalNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            F.relu(self.fc1(x))
            raise ValueError("user bug")

    model = Broken()
    monitor = actmon.watch(model, sample_every=1, strict=True)
    with pytest.raises(ValueError, match="user bug"):
        model(torch.randn(2, 8))
    assert torch._C._len_torch_function_stack() == 0
    monitor.step()
    monitor.close()


def test_include_and_kind_overrides_apply_to_functional_layers():
    monitor = _train(
        FunctionalNet(), _batches(1), exclude=["*.sigmoid#*"], kinds={"*.relu#0": "leaky"}
    )
    kinds = {info.name: info.kind for info in monitor.layers}
    assert "(root).sigmoid#0" not in kinds
    assert kinds["(root).relu#0"] is actmon.Kind.LEAKY


def test_hugging_face_eager_attention_softmax_is_monitored():
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    model.config._attn_implementation = "eager"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = actmon.watch(model, opt, sample_every=1, log_every=2, strict=True)
    ids = [torch.randint(0, 100, (2, 16)) for _ in range(2)]
    for batch in ids:
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    snap = monitor.snapshot()
    assert snap is not None
    name = "transformer.h.0.attn.softmax#0"
    assert name in {info.name for info in monitor.layers}
    soft = snap.layers[name]
    assert soft.kind is actmon.Kind.SOFTMAX
    assert soft.count == 2 * (2 * 2 * 16 * 16)  # two steps of (batch, heads, T, T)
    assert soft.calls == 2
    assert 0.0 < soft.softmax_max_prob <= 1.0
    assert soft.min >= 0.0
    assert soft.max <= 1.0
    # Causal attention: row t has t + 1 non-zero probabilities out of 16.
    assert soft.zero_fraction == pytest.approx(1 - (16 * 17 / 2) / (16 * 16))
    assert monitor.internal_errors_total == 0


def test_functional_layers_when_every_module_is_excluded():
    model = FunctionalNet()
    monitor = _train(model, _batches(1), exclude=["fc*", "out"])
    assert [info.name for info in monitor.layers] == [
        "(root).relu#0",
        "(root).sigmoid#0",
        "(root).log_softmax#0",
    ]
    snap = monitor.snapshot()
    assert snap is not None
    assert snap.layers["(root).relu#0"].count == 32 * 16
