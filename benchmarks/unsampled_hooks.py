"""What an unsampled step costs: forward hooks kept (returning at once) vs registered only for
sampled steps.

Today every watched module keeps its forward hook on every step and the hook returns at once
when the step is not sampled. The alternative registers the forward (and so output-gradient)
hooks at the start of a sampled step and removes them after it, as functional capture already
arms itself. Interleaved rounds, one model copy per configuration, shuffled order per round:

- ``none``: no monitor;
- ``kept``: actmon watching with no step sampled after the first (``sample_every`` and
  ``log_every`` beyond the run): every module's hook is called and returns;
- ``removed``: the same monitor with its module forward hooks taken out after the first step,
  what unsampled steps would cost if the hooks were registered only for sampled steps (the
  per-step parameter hooks of the gradient-norm sentinel stay in both);
- ``noop``: plain ``lambda *a: None`` forward hooks on the same modules, no monitor: torch's own
  price of calling a Python hook.

The price of registering and removing every forward hook once per sampled step is timed
separately and spread over ``sample_every`` steps (the default 20). Run on a CPU this is a
proxy for a GPU: a hook costs host time, which a GPU step hides only while its launches queue
ahead of the host. ``python benchmarks/unsampled_hooks.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import actmon
from benchmarks.workloads import WORKLOADS, Workload, deep_workload

CONFIGS = ("none", "kept", "removed", "noop")


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(work: Workload, model: nn.Module, opt: torch.optim.Optimizer, batch, monitor) -> None:
    loss = work.loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if monitor is not None:
        monitor.step(loss=loss)


def run(
    work: Workload, rounds: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], float]:
    """Step times (s) per configuration over the same interleaved rounds, and the forward-only
    price of one kept hook call (s): the best of many forwards with the hooks kept against the
    best without (a best time is what load on a shared machine cannot inflate)."""
    torch.manual_seed(0)
    base = work.make_model()
    models, opts, monitors = {}, {}, {}
    for config in CONFIGS:
        model = copy.deepcopy(base).to(device)
        models[config], opts[config] = model, work.make_optimizer(model)
        monitors[config] = None
        if config in ("kept", "removed"):
            monitors[config] = actmon.watch(
                model,
                opts[config],
                log_every=10**6,
                sample_every=10**6,
                sinks={"store": {"enabled": False}, "console": {"enabled": False}},
            )
        elif config == "noop":
            for leaf in _leaves(model):
                leaf.register_forward_hook(lambda *a: None)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(t.to(device) for t in work.make_batch(gen)) for _ in range(4)]
    for config in CONFIGS:  # the first (sampled) step, then the monitors' hooks as configured
        _step(work, models[config], opts[config], batches[0], monitors[config])
    attacher = monitors["removed"]._attacher  # type: ignore[union-attr]
    for handle in attacher._handles[: len(attacher.layers)]:  # the module forward hooks
        handle.remove()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    best = {"kept": float("inf"), "removed": float("inf")}
    order = list(CONFIGS)
    shuffle = random.Random(2)
    for r in range(warmup + rounds):
        shuffle.shuffle(order)
        batch = batches[r % len(batches)]
        for config in order:
            _sync(device)
            start = time.perf_counter()
            _step(work, models[config], opts[config], batch, monitors[config])
            _sync(device)
            if r >= warmup:
                times[config].append(time.perf_counter() - start)
        for config in shuffle.sample(list(best), 2):  # forwards only, output freed
            for _ in range(5):
                _sync(device)
                start = time.perf_counter()
                work.loss(models[config], batch)
                _sync(device)
                best[config] = min(best[config], time.perf_counter() - start)
    for monitor in monitors.values():
        if monitor is not None:
            monitor.close()
    per_call = (best["kept"] - best["removed"]) / len(attacher.layers)
    return times, per_call


def register_cost(model: nn.Module, repeats: int = 50) -> float:
    """Seconds to register and remove one forward hook on every leaf module, once."""
    leaves = _leaves(model)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        handles = [leaf.register_forward_hook(lambda *a: None) for leaf in leaves]
        for handle in handles:
            handle.remove()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--sample-every", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    logging.getLogger("actmon").disabled = True  # the deep MLPs' dead-unit alerts
    works = [WORKLOADS["mlp"], deep_workload(50), deep_workload(200)]
    print(f"device: {device}; {args.rounds} interleaved rounds after {args.warmup} warm-up")
    print()
    print(
        "| workload | modules | none ms | kept − none µs | removed − none µs | noop − none µs"
        " | kept − removed µs | one kept hook call µs (best forwards) | register+remove µs"
        f" | its share per step at sample_every={args.sample_every} µs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for work in works:
        times, per_call = run(work, args.rounds, args.warmup, device)
        none = statistics.median(times["none"])
        extra = {c: _paired(times[c], times["none"]) for c in CONFIGS}
        model = work.make_model()
        cost = register_cost(model)
        print(
            f"| {work.name} | {len(_leaves(model))} | {none * 1e3:.2f}"
            f" | {extra['kept']:.0f} | {extra['removed']:.0f} | {extra['noop']:.0f}"
            f" | {_paired(times['kept'], times['removed']):.0f} | {per_call * 1e6:.2f}"
            f" | {cost * 1e6:.0f}"
            f" | {cost / args.sample_every * 1e6:.1f} |",
            flush=True,
        )


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a's step time minus b's in the same round, in µs: steps of one
    round ran back to back, so the machine's load cancels."""
    return statistics.median(x - y for x, y in zip(a, b, strict=True)) * 1e6


if __name__ == "__main__":
    main()
