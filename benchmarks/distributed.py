"""Overhead of actmon in a 2-rank DDP run against the same 2-rank DDP run without it.

    python benchmarks/distributed.py [--steps 40] [--warmup 5] [--workloads mlp,conv]
                                     [--device cpu|cuda] [--backend gloo|nccl] [--threads 1]

Two processes (torch.multiprocessing, 127.0.0.1) train side by side one DDP copy of each
configuration with identical weights: no monitor, actmon's default config ("reduce": windows
reduced over both ranks at each flush, rank 0 exports to the run store), full coverage
(every step sampled), and the default config in "per_rank" mode (no collectives; both ranks
export). Each round runs one step of every configuration in an order shuffled afresh (the
same on both ranks, as DDP needs), after a barrier, so drift in machine speed hits all alike.
Printed by rank 0: median and mean step time over the timed rounds (the mean carries the
window flushes, with their collectives, every log_every steps), the ratios to no monitor, and
the median time of monitor.step() on the steps that end a window (the flush: in "reduce" mode
its collectives and the reduced window's host work).
Nothing here is asserted: these are measurements. ``--device cuda`` puts both ranks on
cuda:0 (gloo can share a GPU; NCCL needs one GPU per rank: ``--backend nccl`` with 2 GPUs).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS

import actmon
from actmon.sinks.prometheus import free_port

WORLD = 2
CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "default": {},
    "full": {"sample_every": 1},
    "per_rank": {"distributed": "per_rank"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if args.device == "cuda" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=WORLD)
    lines = []
    try:
        for name in args.workloads.split(","):
            lines += bench(rank, name, args, device, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print("\n".join(lines), flush=True)
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after DDP work


def bench(
    rank: int, name: str, args: argparse.Namespace, device: torch.device, out: str
) -> list[str]:
    work = WORKLOADS[name]
    torch.manual_seed(0)
    base = work.make_model().to(device)
    models, opts, monitors = {}, {}, {}
    for config, overrides in CONFIGS.items():
        model = DDP(copy.deepcopy(base))
        models[config], opts[config] = model, work.make_optimizer(model)
        if overrides is not None:
            sinks = {"console": {"enabled": False}, "store": {"path": f"{out}/{config}.db"}}
            monitors[config] = actmon.watch(
                model, opts[config], run_name=f"bench-{name}-{config}", sinks=sinks, **overrides
            )
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    batches = [tuple(t.to(device) for t in work.make_batch(gen)) for _ in range(4)]
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    flushes: dict[str, list[float]] = {c: [] for c in CONFIGS}  # monitor.step() at window ends
    order = list(CONFIGS)
    shuffle = random.Random(0).shuffle  # the same order on both ranks
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        shuffle(order)
        for config in order:
            model, opt, monitor = models[config], opts[config], monitors.get(config)
            _sync(device)
            dist.barrier()  # both ranks start the step together
            start = time.perf_counter()
            loss = work.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            flush_start = time.perf_counter()
            if monitor is not None and monitor.step(loss=loss) is not None:
                _sync(device)
                if i >= args.warmup:
                    flushes[config].append(time.perf_counter() - flush_start)
            _sync(device)
            if i >= args.warmup:
                times[config].append(time.perf_counter() - start)
    for monitor in monitors.values():
        monitor.close()
    base_median = statistics.median(times["none"])
    base_mean = statistics.fmean(times["none"])
    lines = [
        f"{work.name} on {WORLD} ranks, {args.backend}, {device.type}, {args.threads} thread(s)"
        f" per rank: {args.steps} timed steps after {args.warmup} warm-up",
        f"  {'config':<10} {'median ms':>10} {'mean ms':>10} {'median x':>9} {'mean x':>8}"
        f" {'flush ms':>9}",
    ]
    for config, values in times.items():
        median, mean = statistics.median(values), statistics.fmean(values)
        flush = f"{statistics.median(flushes[config]) * 1e3:>9.2f}" if flushes[config] else ""
        lines.append(
            f"  {config:<10} {median * 1e3:>10.2f} {mean * 1e3:>10.2f}"
            f" {median / base_median:>9.3f} {mean / base_mean:>8.3f} {flush}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workloads", default="mlp,conv")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    if args.steps < 30:
        parser.error("--steps must be at least 30 (medians of fewer steps are noise)")
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as out:
        mp.spawn(run_rank, args=(args, free_port(), out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
