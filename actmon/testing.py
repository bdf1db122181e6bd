"""A pytest gate on a model's activation health: ``actmon.testing.assert_healthy``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

import actmon


def assert_healthy(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 50,
    max_dead: float = 0.3,
    max_saturated: float = 0.5,
    allow_nonfinite: bool = False,
    **config: Any,
) -> actmon.Snapshot:
    """Train ``steps`` steps (cycling ``batches`` of (input, target)) under the monitor and raise
    AssertionError listing every layer whose final window crosses a limit. Returns that window.

    ``optimizer`` defaults to SGD(lr=0.01); keyword ``config`` goes to ``actmon.watch``.
    """
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    settings = {
        "log_every": min(10, steps),
        "sample_every": 1,
        "checks": True,
        "sinks": {"store": {"enabled": False}, "console": {"enabled": False}},
        **config,
    }
    with actmon.watch(model, optimizer=optimizer, **settings) as monitor:
        for x, y in itertools.islice(itertools.cycle(list(batches)), steps):
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(loss=loss)
    snap = monitor.snapshot()
    assert snap is not None, "assert_healthy: no window was recorded"
    problems = []
    for layer in snap.layers.values():
        if layer.dead_fraction is not None and layer.dead_fraction > max_dead:
            problems.append(
                f"layer {layer.name!r}: dead_fraction {layer.dead_fraction:.3f} > {max_dead}"
            )
        if layer.saturation_fraction is not None and layer.saturation_fraction > max_saturated:
            problems.append(
                f"layer {layer.name!r}: saturation_fraction"
                f" {layer.saturation_fraction:.3f} > {max_saturated}"
            )
    first = monitor.first_nonfinite
    if not allow_nonfinite and first is not None:
        where = f" in layer {first.layer!r}" if first.layer else ""
        problems.append(f"non-finite {first.source} at step {first.step}{where}")
    if snap.loss is not None and not math.isfinite(snap.loss) and not allow_nonfinite:
        problems.append(f"final loss is {snap.loss}")
    if problems:
        raise AssertionError(
            "unhealthy activations after {} steps:\n  {}".format(steps, "\n  ".join(problems))
        )
    return snap
