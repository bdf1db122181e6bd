"""torch.compile: watch(compile(model)) and compile(model) after watch agree with eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import actmon

# Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method; dynamo
# itself reads .grad of the non-leaf layer output it holds at the hook's graph break (a torch
# warning, shown once to users).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]


@pytest.fixture(scope="module", autouse=True)
def _inductor_started() -> None:
    """Inductor's worker pool and progress thread live for the process: start them up front."""
    torch.compile(lambda x: x * 2)(torch.ones(2))


def _close(a: float | None, b: float | None) -> bool:
    return a == b if a is None or b is None else a == pytest.approx(b, rel=1e-4, abs=1e-6)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def _train(model: nn.Module, runner: nn.Module | None, compiled_first: bool, sample_every: int):
    """Train ``model`` (through ``runner``, its compiled form, when given) for 6 steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    target = runner if (runner is not None and compiled_first) else model
    monitor = actmon.watch(target, opt, sample_every=sample_every, log_every=6, strict=True)
    if runner is None:
        forward = model
    elif compiled_first:
        forward = runner
    else:
        forward = torch.compile(model)  # compiled after watch(): the hooks are inside
    torch.manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    return monitor


@pytest.mark.parametrize(
    ("compiled_first", "sample_every"),
    [(True, 1), (False, 2)],
    ids=["watch(compile(model))-every-step", "compile-after-watch-every-other-step"],
)
def test_compiled_statistics_agree_with_eager(compiled_first, sample_every):
    torch._dynamo.reset()
    base = _model()
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    eager = _train(eager_model, None, False, sample_every)
    runner = torch.compile(compiled_model) if compiled_first else compiled_model
    compiled = _train(compiled_model, runner, compiled_first, sample_every)
    assert [i.name for i in compiled.layers] == [i.name for i in eager.layers]  # no _orig_mod.
    assert compiled.internal_errors_total == 0
    want, got = eager.snapshot(), compiled.snapshot()
    assert want is not None
    assert got is not None
    assert got.sampled_steps == want.sampled_steps == tuple(range(1, 7, sample_every))
    for name, w in want.layers.items():
        g = got.layers[name]
        assert (g.count, g.calls, g.units) == (w.count, w.calls, w.units)
        assert g.mean == pytest.approx(w.mean, rel=1e-4, abs=1e-6)
        assert g.std == pytest.approx(w.std, rel=1e-4)
        assert g.max == pytest.approx(w.max, rel=1e-4, abs=1e-6)
        assert g.zero_fraction == pytest.approx(w.zero_fraction, abs=1e-3)
        assert _close(g.output_grad_norm, w.output_grad_norm)
        assert _close(g.grad_norm, w.grad_norm)
    assert set(got.params) == set(want.params)
