"""Overhead of actmon against no monitor, interleaved step by step in one process.

    python benchmarks/overhead.py [--steps 30] [--warmup 5] [--workloads mlp,conv,gpt2]

Three copies of each model with identical weights train side by side: no monitor, actmon's
default config, and full coverage (every step sampled, histograms every step), plus any
--peers (benchmarks/peers.py). Steps run in a freshly shuffled order each round, so drift in
machine speed hits every configuration alike. Printed: median and mean step time, ratios to
no monitor, the monitor's own device buffers, and peak process RSS. Nothing here is asserted:
these are measurements. A heavy peer (tb-histogram) slows its neighbours on a 2-core machine
(memory traffic, its writer thread): compare actmon without peers in a separate run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS
from workloads import WORKLOADS

import actmon

CONFIGS: dict[str, dict[str, object] | None] = {
    "none": None,
    "default": {},
    "full": {"sample_every": 1},
}


def buffer_bytes(monitor: actmon.Monitor) -> int:
    agg = monitor._aggregator
    return sum(
        t.numel() * t.element_size() for t in vars(agg).values() if isinstance(t, torch.Tensor)
    )


def run(
    name: str, steps: int, warmup: int, peers: list[str]
) -> list[tuple[str, float, float, float, float, int]]:
    work = WORKLOADS[name]
    torch.manual_seed(0)
    base = work.make_model()
    models, opts, monitors, others = {}, {}, {}, {}
    configs = [*CONFIGS, *peers]
    for config in configs:
        model = copy.deepcopy(base)
        model.train()
        opt = work.make_optimizer(model)
        models[config], opts[config] = model, opt
        overrides = CONFIGS.get(config)
        if config in PEERS:
            others[config] = PEERS[config](model, opt)
        elif overrides is not None:
            monitors[config] = actmon.watch(model, optimizer=opt, **overrides)
    gen = torch.Generator().manual_seed(1)
    batches = [work.make_batch(gen) for _ in range(4)]
    times: dict[str, list[float]] = {c: [] for c in configs}
    order = list(configs)
    shuffle = random.Random(0).shuffle
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        shuffle(order)  # a fresh order each round: no configuration always follows another
        for config in order:
            model, opt = models[config], opts[config]
            start = time.perf_counter()
            loss = work.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if config in monitors:
                monitors[config].step(loss=loss)
            if config in others:
                others[config].after_step(i)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[config].append(elapsed)
    rows = []
    baseline = statistics.median(times["none"])
    base_mean = statistics.fmean(times["none"])
    for config in configs:
        med = statistics.median(times[config])
        mon = monitors.get(config)
        if config in others and not others[config].recorded():
            raise RuntimeError(f"peer {config} recorded nothing: the comparison would be void")
        if mon is not None and not any(snap.layers for snap in mon.history):
            raise RuntimeError(f"{config} recorded nothing: the comparison would be void")
        mean = statistics.fmean(times[config])
        rows.append(
            (
                config,
                med * 1e3,
                med / baseline,
                mean * 1e3,
                mean / base_mean,
                buffer_bytes(mon) if mon else 0,
            )
        )
    for mon in monitors.values():
        mon.close()
    for peer in others.values():
        peer.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workloads", default="mlp,conv,gpt2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default="", help=f"comma-separated: {', '.join(PEERS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.steps} measured steps"
        f" after {args.warmup} warm-up, configurations interleaved step by step"
    )
    print("median: the typical step; mean: the amortised cost, sampled steps included")
    print(
        f"{'workload':<50} {'config':<8} {'median ms':>10} {'ratio':>7} {'mean ms':>9}"
        f" {'ratio':>7} {'buffers MB':>11}"
    )
    for name in args.workloads.split(","):
        peers = [p for p in args.peers.split(",") if p]
        for config, ms, ratio, mean, mratio, nbytes in run(name, args.steps, args.warmup, peers):
            print(
                f"{WORKLOADS[name].name:<50} {config:<8} {ms:>10.2f} {ratio:>7.3f}"
                f" {mean:>9.2f} {mratio:>7.3f} {nbytes / 2**20:>11.2f}"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak process RSS: {peak:.0f} MB")


if __name__ == "__main__":
    main()
