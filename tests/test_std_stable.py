"""A layer's std against torch.std of the same values (float64, population): constant outputs
read exactly 0 (a constant 1e20 read NaN, a constant 1e5 read 79), a large mean does not
swamp a small spread (N(1e4, 1) read 0), on the fused C path, the torch-ops path (also taken
for non-contiguous layouts), the Triton kernels (in Triton's interpreter on CPU tensors) and a
GPU when there is one."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

import actmon


class Fixed(nn.Module):
    """A leaf layer whose output is a given tensor (made non-contiguous on request: the
    torch-ops path instead of the fused kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.out is not None
        return self.out.clone() if self.out.is_contiguous() else self.out.t().t()


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Fixed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES = {
    "constant 0.1": lambda: torch.full((512, 64), 0.1),
    "constant 1e5": lambda: torch.full((512, 64), 1e5),
    "constant 1e20": lambda: torch.full((512, 64), 1e20),
    "constant -3e38": lambda: torch.full((8, 64), -3e38),
    "N(1e4, 1)": lambda: 1e4 + torch.randn(512, 64, generator=_gen(1)),
    "N(-3e3, 1e-2)": lambda: -3e3 + 1e-2 * torch.randn(512, 64, generator=_gen(2)),
    "N(0, 1)": lambda: torch.randn(512, 64, generator=_gen(3)),
    "N(0, 1e20)": lambda: 1e20 * torch.randn(512, 64, generator=_gen(4)),
    "+-1e20": lambda: torch.tensor([1e20, -1e20] * 32).reshape(2, 32),
}


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _paths() -> list[str]:
    # Not imported here: Triton must be imported after TRITON_INTERPRET is set.
    has_triton = importlib.util.find_spec("triton") is not None
    return ["fused", "torch", "triton"] if has_triton else ["fused", "torch"]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("case", list(CASES))
def test_std_matches_torch_std(case, path, device, monkeypatch):
    if path == "triton":  # the GPU kernels, in Triton's interpreter on CPU tensors
        from actmon import triton_backend

        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            monkeypatch.setattr(triton_backend, "MODE", "force")
    calls = [CASES[case]()]
    if not case.startswith("constant"):  # a window of three different calls
        calls += [calls[0] * 0.5 + calls[0].mean() * 0.5, calls[0].flip(0)[:3]]
    model = Holder().to(device)
    with actmon.watch(
        model,
        log_every=1,
        sample_every=1,
        sinks={"store": {"enabled": False}},
        checks=False,
        rules=[],
    ) as mon:
        for out in calls:
            out = out.to(device)
            model.a.out = out if path != "torch" else out.t().contiguous().t()
            assert model.a.out.is_contiguous() == (path != "torch" or out.shape[0] == 1)
            model(torch.zeros(1, device=device))
        snap = mon.step(loss=1.0)
    got = snap.layers["a"]
    values = torch.cat([c.reshape(-1) for c in calls]).double()
    want_std = torch.std(values, correction=0).item()
    want_mean = values.mean().item()
    assert got.count == values.numel()
    if case.startswith("constant"):
        assert got.std == 0.0
        assert got.mean == pytest.approx(want_mean, rel=1e-12)
    elif want_std > 1e17 and device == "cuda" and got.std == math.inf:
        # The torch-op kernels on a GPU (no triton there) square in float32: a spread this
        # wide overflows (as documented). The Triton kernels redo such a tile in float64.
        pass
    else:
        assert got.std == pytest.approx(want_std, rel=1e-4)
        assert got.mean == pytest.approx(want_mean, rel=1e-5, abs=1e-6 * want_std)
