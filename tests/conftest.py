"""Shared fixtures and independent reference computations (plain torch / numpy)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (servers, writers, pools)."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left running: {left}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch) -> None:
    """Run stores and event files default to ./runs: keep each test's in its own directory."""
    monkeypatch.chdir(tmp_path)


class Capture:
    """Records clones of chosen modules' outputs (and output gradients) with our own hooks."""

    def __init__(self, model: nn.Module, names: list[str], grads: bool = False) -> None:
        self.outputs: dict[str, list[Tensor]] = {n: [] for n in names}
        self.grads: dict[str, list[Tensor]] = {n: [] for n in names}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            self.handles.append(modules[name].register_forward_hook(self._hook(name, grads)))

    def _hook(self, name: str, grads: bool):
        def hook(module: nn.Module, args: object, output: Tensor) -> None:
            self.outputs[name].append(output.detach().clone())
            if grads and output.requires_grad:
                output.register_hook(lambda g: self.grads[name].append(g.detach().clone()))

        return hook

    def reset(self) -> None:
        for v in self.outputs.values():
            v.clear()
        for v in self.grads.values():
            v.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reference_stats(tensors: list[Tensor], unit_axis: int | None = None) -> dict[str, float]:
    """Plain-torch statistics of the concatenation of ``tensors`` (float64 on finite values)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]).double()
    finite = flat[torch.isfinite(flat)]
    out = {
        "count": flat.numel(),
        "sum": flat.sum().item(),
        "mean": flat.mean().item(),
        "std": flat.std(correction=0).item(),
        "min": flat.min().item(),
        "max": flat.max().item(),
        "zeros": int((flat == 0).sum()),
        "nan": int(torch.isnan(flat).sum()),
        "posinf": int((flat == float("inf")).sum()),
        "neginf": int((flat == float("-inf")).sum()),
        "finite_count": finite.numel(),
    }
    if unit_axis is not None:
        per_unit = [
            t.detach().float().movedim(unit_axis, -1).reshape(-1, t.shape[unit_axis]).amax(0)
            for t in tensors
        ]
        unit_max = torch.stack(per_unit).amax(0)
        out["dead_units"] = int((unit_max <= 0).sum())
        out["units"] = unit_max.numel()
        out["batch_dead"] = float(np.mean([int((u <= 0).sum()) for u in per_unit]))
    return out


def reference_raw_hist(tensors: list[Tensor]) -> np.ndarray:
    """The 2048-bin device histogram computed independently with numpy.frexp (no bit tricks).

    Magnitude bin j: 4 per power of two, j = (exponent + 127) * 4 + quarter for normal floats,
    j = |x| // 2**-128 for subnormals and zero, 1020 for Inf, 1022 for NaN; x >= +0 is stored
    at 1024 + j, x <= -0 at j.
    """
    values = np.concatenate([t.detach().float().reshape(-1).numpy() for t in tensors])
    raw = np.zeros(2048, dtype=np.int64)
    for v in values.astype(np.float64):
        negative = np.signbit(v)
        a = abs(v)
        if np.isnan(v):
            j = 1022
        elif np.isinf(v):
            j = 1020
        elif a < 2.0**-126:
            j = int(a // 2.0**-128)
        else:
            m, e = np.frexp(a)  # a = m * 2**e, m in [0.5, 1)
            j = (e - 1 + 127) * 4 + int((2 * m - 1) * 4)
        raw[j if negative else 1024 + j] += 1
    return raw


@pytest.fixture(autouse=True)
def _close_leftover_monitors() -> Iterator[None]:
    """Close monitors a test left open (a test that ends in an expected exception, say), so the
    process-wide SIGTERM/exit registry starts empty for the next test."""
    import actmon.lifecycle

    yield
    for monitor in actmon.lifecycle._monitors():
        monitor.close()
