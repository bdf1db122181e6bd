"""actmon's overhead on torch.compile'd and bf16-autocast training, against the same variant
without the monitor, interleaved step by step in one process.

    python benchmarks/variants.py [--variants compiled,bf16] [--workloads mlp,conv] [--steps 30]

For each workload and variant, three copies with identical weights train side by side in a
freshly shuffled order each round: no monitor, actmon's default config, full coverage
(sample_every=1). Compiled copies are compiled (inductor) separately and warmed up on both a
sampled and an unsampled step before timing, so compile time is not counted. Printed: median
step time and the ratio to the same variant without the monitor. Nothing here is asserted.

Under torch.compile, each monitored layer's forward hook is a graph break on sampled steps (the
statistics run eagerly between compiled regions); unsampled steps run the fused graph, because
dynamo compiles the hook's "not sampling" early return into it. Functional-activation capture
is off inside compiled code.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS

import actmon

CONFIGS: dict[str, dict[str, object] | None] = {
    "none": None,
    "default": {},
    "full": {"sample_every": 1},
}


def run(workload: str, variant: str, steps: int, warmup: int) -> list[tuple[str, float, float]]:
    work = WORKLOADS[workload]
    torch.manual_seed(0)
    base = work.make_model()
    trainers = {}
    for name, overrides in CONFIGS.items():
        model = copy.deepcopy(base).train()
        opt = work.make_optimizer(model)
        monitor = None
        if overrides is not None:
            monitor = actmon.watch(
                model, opt, sinks={"store": {"enabled": False}}, checks=False, **overrides
            )
        runner = torch.compile(model) if variant == "compiled" else model
        trainers[name] = (runner, opt, monitor)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant == "bf16" else nullcontext
    )
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    order = list(CONFIGS)
    for step in range(warmup + steps):
        batch = work.make_batch(gen)
        random.shuffle(order)
        for name in order:
            runner, opt, monitor = trainers[name]
            start = time.perf_counter()
            with autocast():
                loss = work.loss(runner, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if monitor is not None:
                monitor.step(loss.detach())
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    for _, _, monitor in trainers.values():
        if monitor is not None:
            assert monitor.snapshot() is not None, "the monitor recorded nothing"
            monitor.close()
    base_ms = statistics.median(times["none"]) * 1e3
    return [
        (name, statistics.median(t) * 1e3, statistics.median(t) * 1e3 / base_ms)
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="compiled,bf16")
    parser.add_argument("--workloads", default="mlp,conv")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=25)  # > sample_every: both variants seen
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("actmon").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps after warm-up")
    print(f"{'workload':10} {'variant':9} {'config':8} {'median ms':>10} {'ratio':>6}")
    for workload in args.workloads.split(","):
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            for name, ms, ratio in run(workload, variant, args.steps, args.warmup):
                print(f"{workload:10} {variant:9} {name:8} {ms:10.2f} {ratio:6.2f}", flush=True)


if __name__ == "__main__":
    main()
