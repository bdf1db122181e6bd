"""2,000 steps: the monitor's memory, live tensors and hooks stay flat; close() removes all."""

from __future__ import annotations

import gc

import psutil
import torch
from torch import nn

import actmon


def _tensors() -> list[torch.Tensor]:
    gc.collect()
    # type() rather than isinstance(): isinstance() on every object trips deprecation shims.
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]


def test_two_thousand_steps_do_not_grow_memory_or_tensors():
    # Tensors that earlier tests left to other threads stay alive until this test ends, so
    # the counts below move only with this test's own tensors.
    earlier = _tensors()
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = actmon.watch(model, optimizer=opt, log_every=10, sample_every=1, history=50)
    process = psutil.Process()
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    marks = {}
    try:
        for step in range(1, 2001):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
            if step in (1000, 2000):  # history is full (50 windows) well before step 1000
                marks[step] = (len(_tensors()), process.memory_info().rss)
        assert monitor.step_count == 2000
        assert len(monitor.history) == 50
        tensors_1000, rss_1000 = marks[1000]
        tensors_2000, rss_2000 = marks[2000]
        assert tensors_2000 == tensors_1000
        assert rss_2000 - rss_1000 < 8 * 2**20, (rss_1000, rss_2000)
    finally:
        monitor.close()
    del earlier
    for module in model.modules():
        assert not module._forward_hooks
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_step_post_hooks
