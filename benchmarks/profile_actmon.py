"""Where actmon's overhead goes: cProfile (Python functions) and torch.profiler (operators).

    python benchmarks/profile_actmon.py [--workload mlp] [--config full] [--steps 100]
    python benchmarks/profile_actmon.py --workload deep1000 --config default
    python benchmarks/profile_actmon.py --ablation       # which statistic costs what
    py-spy record -o flame.svg -- python benchmarks/profile_actmon.py --profiler none

Trains the workload with the chosen actmon configuration (or none) and prints the functions
with the most own time, those in actmon/ first, and the operators with the most self CPU time.
Profilers add their own cost; read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import overhead  # noqa: E402
from overhead import ACTMON_CONFIGS, interleaved, ratios, train_step  # noqa: E402
from workloads import WORKLOADS, deep_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="mlp", help="mlp, conv, gpt2 or deep<N>")
    parser.add_argument("--config", default="full", help="none, default or full")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profiler", default="both", help="cprofile, torch, both or none")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ablation", action="store_true", help="interleave variants of full")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.workload.startswith("deep"):
        work = deep_workload(int(args.workload[4:]))
    else:
        work = WORKLOADS[args.workload]
    if args.ablation:
        ablation(work, args.steps, args.warmup)
        return
    torch.manual_seed(0)
    model = work.make_model()
    opt = work.make_optimizer(model)
    monitor = None
    if args.config != "none":
        import actmon

        sinks = {
            "console": {"enabled": False},
            "store": {"path": f"{tempfile.mkdtemp()}/actmon.db"},
        }
        monitor = actmon.watch(model, optimizer=opt, sinks=sinks, **ACTMON_CONFIGS[args.config])
    gen = torch.Generator().manual_seed(1)
    batches = [work.make_batch(gen) for _ in range(4)]

    def steps(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            loss = train_step(work, model, opt, batches[i % 4])
            if monitor is not None:
                monitor.step(loss=loss)
        return (time.perf_counter() - start) / n

    steps(args.warmup)
    before = monitor.overhead_seconds_total if monitor else 0.0
    plain = steps(args.steps)
    own = (monitor.overhead_seconds_total - before) / args.steps if monitor else 0.0
    print(
        f"{work.name}, {args.config}: {plain * 1e3:.2f} ms/step unprofiled; actmon's own"
        f" timers (hooks + step()): {own * 1e3:.2f} ms/step"
    )
    if args.profiler in ("cprofile", "both"):
        profile = cProfile.Profile()
        profile.enable()
        steps(args.steps)
        profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        print(f"\n--- cProfile, {args.steps} steps, by own time ---")
        print(_trim(out.getvalue()))
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("cumulative").print_stats("actmon", args.top)
        print(f"--- cProfile, actmon functions by cumulative time ({args.steps} steps) ---")
        print(_trim(out.getvalue()))
    if args.profiler in ("torch", "both"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(args.steps)
        print(f"--- torch.profiler, {args.steps} steps, by self CPU time ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.profiler == "none":
        steps(args.steps * 5)  # something for py-spy to sample
    if monitor is not None:
        monitor.close()


ABLATION: dict[str, dict[str, object]] = {
    "full": ACTMON_CONFIGS["full"],
    "full-no-grad-hist": {"sample_every": 1},
    "acts-only": {
        "sample_every": 1,
        "gradients": {"output": False, "parameters": False, "update_ratio": False},
    },
    "acts+out-grads": {
        "sample_every": 1,
        "gradients": {"parameters": False, "update_ratio": False, "histogram": True},
    },
    "no-sampling": {"sample_every": 10**9, "checks": False},
}


def ablation(work: object, steps: int, warmup: int) -> None:
    """Interleave none and variants of full coverage; each row's extra cost over the one above
    is what the added statistic costs per step."""
    overhead.ACTMON_CONFIGS.update(ABLATION)
    configs = ["none", *ABLATION]
    timings = interleaved(work, configs, {c: steps for c in configs}, warmup, torch.device("cpu"))
    base = ratios(timings, "none")[0]
    print(f"{work.name}: {steps} interleaved steps each")  # type: ignore[attr-defined]
    print(f"{'config':<20} {'median ms':>10} {'ratio':>7} {'extra ms':>9}")
    for config in configs:
        med, ratio, _, _ = ratios(timings, config)
        print(f"{config:<20} {med:>10.2f} {ratio:>7.3f} {med - base:>9.2f}")


def _trim(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:])


if __name__ == "__main__":
    main()
