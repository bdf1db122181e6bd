"""Activation checkpointing: the forward recomputed in backward is not counted twice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import actmon


class Checkpointed(nn.Module):
    def __init__(self, mode: bool | None) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)
        self.mode = mode  # None: no checkpoint; else use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode)
        return self.head(h)


def _run(model: nn.Module, batches: list[torch.Tensor]) -> actmon.Snapshot:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = actmon.watch(model, opt, sample_every=1, log_every=len(batches), strict=True)
    for x in batches:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    monitor.close()
    snap = monitor.snapshot()
    assert snap is not None
    return snap


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_block_counts_each_forward_once(reentrant):
    torch.manual_seed(0)
    plain = Checkpointed(None)
    ckpt = copy.deepcopy(plain)
    ckpt.mode = reentrant
    batches = [torch.randn(4, 8) for _ in range(3)]
    want, got = _run(plain, batches), _run(ckpt, batches)
    assert set(got.layers) == set(want.layers)
    for name in want.layers:
        a, b = got.layers[name], want.layers[name]
        assert (
            (a.calls, a.count, a.sampled_steps)
            == (b.calls, b.count, b.sampled_steps)
            == (
                3,
                b.count,
                3,
            )
        )
        assert a.mean == pytest.approx(b.mean, rel=1e-6, abs=1e-7)
        assert list(a.hist_counts) == list(b.hist_counts)
        assert a.output_grad_norm == pytest.approx(b.output_grad_norm, rel=1e-5)
    assert got.layers["block.1"].dead_units == want.layers["block.1"].dead_units


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_evaluation_under_no_grad_is_still_left_out():
    model = Checkpointed(True)
    monitor = actmon.watch(model, sample_every=1, log_every=1, strict=True)
    with torch.no_grad():
        model(torch.randn(4, 8))
    model(torch.randn(4, 8)).sum().backward()
    snap = monitor.step()
    monitor.close()
    assert snap is not None
    assert snap.layers["block.0"].calls == 1  # the training forward, recomputed once
