"""Functional capture is bounded: a hand-written RNN calling torch.tanh per time step, with a
sequence length that varies, has a fixed number of layers; calls beyond functional_max_calls
are summarised together in one layer (checked element for element)."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from torch import nn

import actmon


class TanhRNN(nn.Module):
    def __init__(self, features: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(features, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


@pytest.mark.parametrize("limit", [16, 4])
def test_rnn_with_varying_length_has_a_bounded_number_of_layers(caplog, limit):
    torch.manual_seed(0)
    rng = random.Random(0)
    model = TanhRNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch, steps, log_every = 3, 40, 4
    lengths = [rng.randint(2, 60) for _ in range(steps)]
    counts = []
    config = {"functional_max_calls": limit} if limit != 16 else {}
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(
            model,
            optimizer=opt,
            log_every=log_every,
            sample_every=1,
            sinks={"store": {"enabled": False}},
            **config,
        ) as mon,
    ):
        for length in lengths:
            model(torch.randn(batch, length, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            snap = mon.step(loss=1.0)
            if snap is not None:
                counts.append(snap)
    names = list(counts[-1].layers)
    tanh = sorted(n for n in names if ".tanh#" in n)
    assert len(names) == 3 + limit + 1  # three Linear layers, limit + 1 tanh sites
    assert tanh == sorted([f"(root).tanh#{k}" for k in range(limit)] + [f"(root).tanh#{limit}+"])
    assert all(len(s.layers) <= len(names) for s in counts)
    # The aggregated layer holds every element of calls `limit` and later, window by window.
    for w, snap in enumerate(counts):
        window = lengths[w * log_every : (w + 1) * log_every]
        expected = sum(max(t - limit, 0) for t in window) * batch * 8
        agg = snap.layers[f"(root).tanh#{limit}+"]
        assert agg.count == expected, (w, window)
        first = snap.layers["(root).tanh#0"]
        assert first.count == log_every * batch * 8
    warned = [r for r in caplog.records if "functional_max_calls" in r.getMessage()]
    assert len(warned) == 1
    assert f"'(root).tanh#{limit}+'" in warned[0].getMessage()
