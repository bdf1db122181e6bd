"""Does actmon make the host wait for the GPU on steps that do not end a window? (CUDA only)

    python benchmarks/gpu_sync_check.py [--workloads mlp,conv,gpt2] [--configs default,full]

Each workload trains on the GPU under each actmon configuration. After a warm-up (buffers
allocated, index tensors cached), ``torch.cuda.set_sync_debug_mode("warn")`` is on for every
step, and each synchronizing CUDA call is caught with the Python stack that made it. A sync
whose stack passes through actmon/ on a step that is not window-ending, sampled or not, is a
bug (the design allows one device-to-host copy per window). The same steps without a monitor
show the workload's own syncs, which are not actmon's. Nothing is asserted: it prints, and
exits 1 when actmon synced outside a window flush.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import threading
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from overhead import ACTMON_CONFIGS, train_step  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

ROOT = str(HERE.parent / "actmon")


class SyncCatcher:
    """Collects each sync warning with the stack that raised it (any thread)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[str]]] = []  # (phase, frames)
        self.phase = "setup"
        self._lock = threading.Lock()

    def showwarning(
        self,
        message: Any,
        category: Any,
        filename: str,
        lineno: int,
        file: Any = None,
        line: Any = None,
    ) -> None:
        if "synchronizing" not in str(message):
            return
        frames = [
            f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
            for f in traceback.extract_stack()[:-1]
            if "warnings.py" not in f.filename
        ]
        with self._lock:
            self.events.append((self.phase, frames))


def actmon_frame(frames: list[str]) -> str | None:
    """The innermost frame inside actmon/, or None when actmon is not on the stack."""
    inside = [f for f in frames if f.startswith(ROOT)]
    return inside[-1].replace(str(HERE.parent) + "/", "") if inside else None


def check(name: str, config: str, steps: int, device: torch.device) -> tuple[int, list[str]]:
    import actmon

    work = WORKLOADS[name]
    torch.manual_seed(0)
    base = work.make_model().to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(t.to(device) for t in work.make_batch(gen)) for _ in range(4)]
    lines = []
    bad = 0
    catcher = SyncCatcher()
    original = warnings.showwarning
    for monitored in (False, True):
        model = copy.deepcopy(base)
        opt = work.make_optimizer(model)
        monitor = None
        if monitored:
            sinks = {
                "console": {"enabled": False},
                "store": {"path": f"{tempfile.mkdtemp()}/actmon.db"},
            }
            monitor = actmon.watch(model, optimizer=opt, sinks=sinks, **ACTMON_CONFIGS[config])
        log_every = monitor.config.log_every if monitor else 10
        sample_every = monitor.config.sample_every if monitor else 1
        warmup = 2 * max(log_every, sample_every)
        for i in range(warmup):  # first windows: buffers, specs and index caches are made
            loss = train_step(work, model, opt, batches[i % 4])
            if monitor is not None:
                monitor.step(loss=loss)
        torch.cuda.synchronize(device)
        catcher.events.clear()
        warnings.showwarning = catcher.showwarning
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = catcher.showwarning
                for i in range(warmup, warmup + steps):
                    n = i + 1  # the monitor's step number
                    flush = n % log_every == 0
                    sampled = (n - 1) % sample_every == 0
                    catcher.phase = "flush" if flush else "sampled" if sampled else "unsampled"
                    loss = train_step(work, model, opt, batches[i % 4])
                    if monitor is not None:
                        monitor.step(loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
        torch.cuda.synchronize(device)
        label = config if monitored else "none"
        counts: Counter[tuple[str, str]] = Counter()
        where: dict[tuple[str, str | None], list[str]] = {}
        for phase, frames in catcher.events:
            frame = actmon_frame(frames)
            counts[(phase, "actmon" if frame else "workload")] += 1
            key = (phase, frame)
            if frame and key not in where:
                where[key] = frames
        summary = ", ".join(f"{p}/{w}: {c}" for (p, w), c in sorted(counts.items())) or "none"
        lines.append(f"{work.name} [{label}] {steps} steps: syncs {summary}")
        if monitor is not None:
            errors = dict(monitor.errors)
            if errors:
                lines.append(f"  actmon internal errors: {errors}")
            monitor.close()
        for (phase, frame), frames in where.items():
            if phase != "flush":
                bad += 1
            tag = "BUG (not a flush step)" if phase != "flush" else "expected (window flush)"
            lines.append(f"  {tag}: {phase} step, in {frame}")
            if phase != "flush":
                for f in frames[-8:]:
                    lines.append(f"      {f.replace(str(HERE.parent) + '/', '')}")
    return bad, lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="mlp,conv,gpt2")
    parser.add_argument("--configs", default="default,full")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    total = 0
    for name in args.workloads.split(","):
        for config in args.configs.split(","):
            bad, lines = check(name, config, args.steps, device)
            total += bad
            print("\n".join(lines), flush=True)
    print("actmon synced outside window flushes" if total else "no actmon sync outside flushes")
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
