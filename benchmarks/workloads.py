"""The benchmark workloads: MLP, conv net with BN + inplace ReLU, tiny GPT-2 (synthetic data),
and deep narrow MLPs for the per-layer cost. Seeds are fixed by the caller (torch.manual_seed
before make_model, a seeded Generator for make_batch)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[Tensor, ...]]
    loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]


def mlp(widths: tuple[int, ...] = (784, 512, 256, 128, 64, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv_net() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.MaxPool2d(2),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def tiny_gpt2(
    n_layer: int = 4, n_embd: int = 256, n_head: int = 4, vocab: int = 2000, positions: int = 128
) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def deep_mlp(blocks: int, width: int = 32) -> nn.Sequential:
    """``blocks`` x (Linear(width, width), ReLU), then a Linear head: 2 * blocks + 1 leaf modules.

    He-normal initialisation keeps activations finite through 1,000 ReLU layers.
    """
    layers: list[nn.Module] = []
    for _ in range(blocks):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def deep_workload(blocks: int, width: int = 32, batch: int = 64) -> Workload:
    return Workload(
        f"MLP {blocks} x (Linear {width}, ReLU), batch {batch}",
        lambda: deep_mlp(blocks, width),
        lambda g: (
            torch.randn(batch, width, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        ),
        _ce,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    )


def _ce(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _lm(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return model(input_ids=batch[0], labels=batch[0]).loss


WORKLOADS = {
    "mlp": Workload(
        "MLP 784-512-256-128-64-10, batch 128",
        mlp,
        lambda g: (torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)),
        _ce,
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    ),
    "conv": Workload(
        "conv 4x(Conv-BN-ReLU inplace), 3x32x32, batch 32",
        conv_net,
        lambda g: (
            torch.randn(32, 3, 32, 32, generator=g),
            torch.randint(0, 10, (32,), generator=g),
        ),
        _ce,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
    ),
    "gpt2": Workload(
        "GPT-2 4 layers, width 256, batch 8x128",
        tiny_gpt2,
        lambda g: (torch.randint(0, 2000, (8, 128), generator=g),),
        _lm,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4),
    ),
}
