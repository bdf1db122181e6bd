"""What practitioners use today, covering every leaf module, for side-by-side timing.

Each peer has ``attach(model, optimizer)``, ``after_step(step)`` and ``recorded()`` (so no
monitor that silently did nothing is compared), and ``close()``.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]


def _tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


class ItemHooks:
    """The hand-rolled approach: mean/std/zero-fraction/min/max with .item() per layer, plus
    per-parameter gradient norms after backward."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.rows = model, 0
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in _leaves(model)]
        self.stats: dict[str, dict[str, float]] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _tensor(output)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            d = t.detach().float()
            self.stats[name] = {
                "mean": d.mean().item(),
                "std": d.std().item(),
                "zero": (d == 0).float().mean().item(),
                "min": d.min().item(),
                "max": d.max().item(),
            }
            self.rows += 1

        return hook

    def after_step(self, step: int) -> None:
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                self.stats[f"grad/{name}"] = {"norm": p.grad.norm().item()}

    def recorded(self) -> bool:
        return self.rows > 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class TensorBoardHistograms:
    """``SummaryWriter.add_histogram`` of every layer output and output gradient, every step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = tempfile.mkdtemp(prefix="bench-tb-")
        self.writer = SummaryWriter(self.dir)
        self.step, self.rows = 0, 0
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in _leaves(model)]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _tensor(output)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            self.writer.add_histogram(f"act/{name}", t.detach().float(), self.step)
            self.rows += 1
            if t.requires_grad:
                t.register_hook(
                    lambda g: self.writer.add_histogram(
                        f"grad/{name}", g.detach().float(), self.step
                    )
                )

        return hook

    def after_step(self, step: int) -> None:
        self.step = step
        self.writer.flush()  # its writer thread's work is charged to its own step, not others'

    def recorded(self) -> bool:
        return self.rows > 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.writer.close()


PEERS = {"item-hooks": ItemHooks, "tb-histogram": TensorBoardHistograms}
