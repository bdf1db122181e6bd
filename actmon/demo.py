"""The demo: a real small training on scikit-learn's digits with the monitor attached.

Nothing is downloaded: ``load_digits`` ships with scikit-learn. The model is an MLP with one
hidden layer pushed towards dying ReLUs by a strongly negative bias on half its units, so the
table shows what a dead layer looks like beside healthy ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from torch import nn

import actmon
from actmon.sinks.console import ConsoleSink


@dataclass
class DemoResult:
    monitor: actmon.Monitor
    final_loss: float
    accuracy: float


def digits_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    second = model[2]
    assert isinstance(second, nn.Linear)
    with torch.no_grad():  # half of the second hidden layer starts (and stays) dead
        second.bias[:32] = -50.0
    return model


def run_demo(
    steps: int = 300,
    batch_size: int = 64,
    log_every: int = 50,
    console: Console | None = None,
    config: str | None = None,
    out: str = "runs",
) -> DemoResult:
    """Train on digits with every sink on: run store, TensorBoard, Prometheus, console table."""
    from sklearn.datasets import load_digits

    console = console or Console()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    model = digits_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    table = ConsoleSink(every=max(1, steps // log_every), console=console)
    run = "digits-demo"
    sinks = {
        "store": {"enabled": True, "path": f"{out}/{run}/actmon.db"},
        "tensorboard": {"enabled": True, "log_dir": f"{out}/{run}/tensorboard"},
        "prometheus": {"enabled": True, "port": 0},
        "console": {"enabled": False},  # the full table below instead of the compact view
    }
    with actmon.watch(
        model,
        optimizer=opt,
        config=config,
        extra_sinks=[table],
        log_every=log_every,
        run_name=run,
        sinks=sinks,
    ) as monitor:
        loss = torch.tensor(0.0)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch_size,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
        url = monitor.prometheus_url
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    console.print(
        f"trained {steps} steps on digits: final loss {loss.item():.3f}, accuracy"
        f" {accuracy:.1%}; monitor overhead {monitor.overhead_seconds_total * 1e3:.0f} ms,"
        f" internal errors {monitor.internal_errors_total}"
    )
    console.print(f"run store:   {out}/{run}/actmon.db")
    console.print(f"TensorBoard: tensorboard --logdir {out}/{run}/tensorboard")
    console.print(f"Prometheus:  {url} (served while training)")
    return DemoResult(monitor, loss.item(), accuracy)
