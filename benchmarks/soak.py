"""Soak: many steps with a window every step; prints memory, tensors, threads, fds, store size.

    python benchmarks/soak.py [--steps 20000] [--every 2000]

Printed, never asserted (tests/test_soak.py asserts a 2,000-step version). Flat RSS, live tensor,
thread and file-descriptor counts after warm-up, and a store that grows linearly, are the
expected figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

import actmon


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=2_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tmp = Path(tempfile.mkdtemp(prefix="actmon-soak-"))
    path = tmp / "soak.db"
    process = psutil.Process()
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    print(
        f"{'step':>7} {'RSS MB':>8} {'tensors':>8} {'threads':>8} {'fds':>5} {'store MB':>9}"
        f" {'s/1k steps':>11}"
    )
    start = time.perf_counter()
    with actmon.watch(
        model, optimizer=opt, log_every=1, sample_every=1, sinks={"store": {"path": str(path)}}
    ) as monitor:
        for step in range(1, args.steps + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
            if step % args.every == 0:
                elapsed = time.perf_counter() - start
                size = sum(f.stat().st_size for f in tmp.iterdir()) / 2**20
                print(
                    f"{step:>7} {process.memory_info().rss / 2**20:>8.1f} {live_tensors():>8}"
                    f" {threading.active_count():>8} {len(os.listdir('/proc/self/fd')):>5}"
                    f" {size:>9.1f} {elapsed / step * 1000:>11.2f}",
                    flush=True,
                )
    print(
        f"internal errors {monitor.internal_errors_total}, dropped windows"
        f" {monitor.dropped_windows}; store kept at {path}"
    )


if __name__ == "__main__":
    main()
