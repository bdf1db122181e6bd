"""actmon's overhead against no monitor and against the tools practitioners use, side by side.

    python benchmarks/overhead.py                       # everything (make bench), ~12-15 min
    python benchmarks/overhead.py --markdown benchmarks/RESULTS.md
    python benchmarks/overhead.py --only timing --workloads mlp --peers none
    python benchmarks/overhead.py --device cuda --only timing,flush

Sections (``--only``):

* timing -- for each workload (W1 MLP, W2 conv net, W3 GPT-2; benchmarks/workloads.py) one copy
  of the model per configuration, identical weights, trained side by side in one process: no
  monitor, actmon's default config and actmon full coverage first alone, then again beside
  every peer that is installed (benchmarks/peers.py; absent ones are skipped with a note).
  Each round runs one step of every configuration in a freshly shuffled order, so drift in
  machine speed hits all alike. Median step time (the typical step) and mean (the amortised
  cost, sampled and window-ending steps included), each as a ratio to no monitor over the
  same rounds. Every monitor must show what it recorded, read back where it wrote it, or the
  run stops.
* flush -- from the same run: actmon's monitor.step() on window-ending steps (the one
  device-to-host copy, the Snapshot, rules, hand-over to the sink threads) against other steps.
* memory -- peak RSS cannot be told apart inside one shared process, so each (workload,
  configuration) runs again alone in short fresh subprocesses, in interleaved rounds
  (``--memory-repeats``, 5 for no monitor and actmon, one for each peer): the median peak RSS
  (VmHWM, imports included), its range, and the growth from set-up (model, optimizer and
  monitor built) to the peak. One process's peak moves by tens of MB on its own.
* scaling -- 10-, 100- and 1,000-block MLPs of width 32 (Linear + ReLU per block) under none /
  default / full; the least-squares slope of overhead against blocks is the per-layer cost.
* soak -- benchmarks/soak.py for 2,000 steps (a window every step, the store on): RSS, live
  tensors, threads and file descriptors must stay flat.

Nothing here is asserted: these are measurements. On a small shared machine run it when the
machine is otherwise idle; ratios stay fair under load because configurations are interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # actmon from this checkout when it is not installed
from peers import DESCRIPTIONS, PEERS, available, make_peer  # noqa: E402
from workloads import WORKLOADS, Workload, deep_workload  # noqa: E402

# Every actmon configuration keeps the console off (a terminal would get a live table) and
# its run store in a temporary folder; the store stays on, as it is in the default config.
ACTMON_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    # Full coverage: every step sampled, activation histograms (always on) and output-gradient
    # histograms (gradients.histogram) on every step; every other statistic is on by default.
    "full": {"sample_every": 1, "gradients": {"histogram": True}},
}
CONFIG_DESCRIPTIONS = {
    "none": "no monitor",
    "default": "actmon default config (sample_every=20, log_every=20, store sink)",
    "full": "actmon full coverage: sample_every=1, activation + gradient histograms every step",
}
# Measured steps per configuration and workload: with peers, and actmon alone (multiples of
# sample_every=20 and log_every=20, so the mean holds whole sampling periods).
STEPS = {"mlp": 200, "conv": 100, "gpt2": 40}
STEPS_ALONE = {"mlp": 400, "conv": 200, "gpt2": 60}
MIN_STEPS = {"wandb-100": 100}  # a peer that writes every 100 steps needs 100 measured
FAILED: dict[str, str] = {}  # "workload: peer" -> why it could not start
SCALING_BLOCKS = (10, 100, 1000)


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak over
    fork and exec into a child's ru_maxrss, which would give every probe the parent's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ActmonAdapter:
    """actmon behind the peers' interface; times monitor.step() for the flush figures."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, name: str) -> None:
        import actmon

        self.dir = tempfile.mkdtemp(prefix="bench-actmon-")
        sinks = {"console": {"enabled": False}, "store": {"path": f"{self.dir}/actmon.db"}}
        self.monitor = actmon.watch(
            model,
            optimizer=optimizer,
            run_name=f"bench-{name}",
            sinks=sinks,
            **ACTMON_CONFIGS[name],
        )
        self.step_times: list[tuple[float, bool]] = []  # (seconds in monitor.step(), flushed)

    def after_step(self, step: int, loss: Tensor) -> None:
        start = time.perf_counter()
        snapshot = self.monitor.step(loss=loss)
        self.step_times.append((time.perf_counter() - start, snapshot is not None))

    def close(self) -> None:
        self.monitor.close()

    def recorded(self) -> tuple[int, str]:
        history = list(self.monitor.history)
        stats = [s for snap in history for s in snap.layers.values()]
        layers = {s.name for s in stats if s.count}
        hists = sum(int(s.hist_counts.sum() > 0) for s in stats)
        grad_hists = sum(
            int(s.output_grad_hist_counts is not None and s.output_grad_hist_counts.sum() > 0)
            for s in stats
        )
        grads = sum(s.output_grad_norm is not None for s in stats)
        store = self.monitor.delivered_windows.get("store", 0)
        errors = self.monitor.internal_errors_total
        agg = self.monitor._aggregator
        buffers = sum(
            t.numel() * t.element_size() for t in vars(agg).values() if isinstance(t, Tensor)
        )
        return len(layers), (
            f"{len(history)} windows, {len(layers)}/{len(self.monitor.layers)} layers with data;"
            f" layer-windows with: {hists} activation histograms, {grads} output-grad norms,"
            f" {grad_hists} output-grad histograms; {store} windows in the store,"
            f" {errors} internal errors; {buffers / 2**20:.1f} MB of window buffers"
        )


def make_monitor(name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    if name == "none":
        return None
    if name in ACTMON_CONFIGS:
        return ActmonAdapter(model, optimizer, name)
    return make_peer(name, model, optimizer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    work: Workload, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, ...]
) -> Tensor:
    loss = work.loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


@dataclass
class Timing:
    config: str
    times: dict[int, float] = field(default_factory=dict)  # round -> seconds
    monitor: Any = None
    recorded: str = ""


def interleaved(
    work: Workload,
    configs: list[str],
    steps: dict[str, int],
    warmup: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Timing]:
    """Train one model copy per configuration, one step each per round, shuffled per round.

    A configuration takes part in ``warmup + steps[config]`` rounds ("none" in all of them), so
    a ratio is always taken over rounds both ran.
    """
    torch.manual_seed(seed)
    base = work.make_model()
    models, opts, timings = {}, {}, {}
    for config in list(configs):
        model = copy.deepcopy(base).to(device)
        model.train()
        opt = work.make_optimizer(model)
        models[config], opts[config] = model, opt
        try:
            timings[config] = Timing(config, monitor=make_monitor(config, model, opt))
        except Exception as exc:  # a peer that cannot start here is reported, not fatal
            if config in ACTMON_CONFIGS:
                raise
            FAILED[f"{work.name}: {config}"] = f"{type(exc).__name__}: {exc}"
            print(f"  {config} failed to start: {type(exc).__name__}: {exc}", flush=True)
            configs = [c for c in configs if c != config]
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(t.to(device) for t in work.make_batch(gen)) for _ in range(4)]
    rounds = warmup + max(steps[c] for c in configs)
    shuffle = random.Random(seed).shuffle
    for i in range(rounds):
        order = [c for c in configs if c == "none" or i < warmup + steps[c]]
        shuffle(order)  # a fresh order each round: no configuration always follows another
        batch = batches[i % len(batches)]
        for config in order:
            model, opt, timing = models[config], opts[config], timings[config]
            _sync(device)
            start = time.perf_counter()
            loss = train_step(work, model, opt, batch)
            if timing.monitor is not None:
                timing.monitor.after_step(i, loss)
            _sync(device)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                timing.times[i] = elapsed
    for timing in timings.values():
        if timing.monitor is not None:
            timing.monitor.close()
    for timing in timings.values():
        if timing.monitor is not None:
            count, timing.recorded = timing.monitor.recorded()
            if count <= 0:
                raise RuntimeError(
                    f"{timing.config} recorded nothing ({timing.recorded}): the comparison"
                    " would be void"
                )
    return timings


def ratios(timings: dict[str, Timing], config: str) -> tuple[float, float, float, float]:
    """(median ms, median ratio, mean ms, mean ratio) against "none" over the same rounds."""
    mine = timings[config].times
    base = [timings["none"].times[r] for r in mine]
    values = list(mine.values())
    med, mean = statistics.median(values), statistics.fmean(values)
    return (
        med * 1e3,
        med / statistics.median(base),
        mean * 1e3,
        mean / statistics.fmean(base),
    )


# ---- report ------------------------------------------------------------------------------
class Report:
    """Prints each table as it is made and keeps it for the markdown file."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def section(self, title: str, text: str = "") -> None:
        print(f"\n== {title} ==", flush=True)
        if text:
            print(text, flush=True)
        self.parts.append(f"\n## {title}\n")
        if text:
            self.parts.append(text + "\n")

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text + "\n")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]
        line = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        print(line(header))
        for row in rows:
            print(line(row), flush=True)
        numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]
        md = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
        ]
        md += ["| " + " | ".join(row) + " |" for row in rows]
        self.parts.append("\n".join(md) + "\n")

    def code(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append("```\n" + text.rstrip() + "\n```\n")


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("%") or "0")
    except ValueError:
        return False
    return True


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


# ---- sections ----------------------------------------------------------------------------
def timing_section(
    report: Report, args: argparse.Namespace, peers: list[str], device: torch.device
) -> dict[str, dict[str, Timing]]:
    """Two interleaved runs per workload: actmon alone (none / default / full), then side by side
    with every peer. A peer with background work (TensorBoard's writer thread, wandb's service
    process) competes for the cores with whatever runs next and slows its neighbours on a small
    machine, so actmon's own ratios are taken from the first run."""
    report.section(
        "Step time: actmon alone, interleaved in one process",
        "median: the typical step; mean: amortised, sampled and window-ending steps included;"
        " ratios are to no monitor over the same rounds.",
    )
    alone: dict[str, dict[str, Timing]] = {}
    rows, recorded = [], []
    for name in args.workloads:
        work = WORKLOADS[name]
        configs = ["none", *ACTMON_CONFIGS]
        n = args.steps or STEPS_ALONE[name]
        timings = _run(work, configs, {c: n for c in configs}, args, device)
        alone[name] = timings
        rows += _rows(work, timings, configs)
        recorded += _recorded(work, timings, configs)
    report.table(HEADER, rows)
    if not peers:
        report.note("\nWhat each monitor recorded (read back after the run):")
        report.table(["workload", "config", "recorded"], recorded)
        return alone
    report.section(
        "Step time: side by side with the peers, interleaved in one process",
        "All configurations in one run, so they share the machine's state; a configuration that"
        " needs more steps to record anything (wandb-100) runs on with no monitor after the"
        " others stop. Background work of heavy peers slows every neighbour here.",
    )
    rows = []
    for name in args.workloads:
        work = WORKLOADS[name]
        configs = ["none", *ACTMON_CONFIGS, *peers]
        n = args.steps or STEPS[name]
        steps = {c: max(n, MIN_STEPS.get(c, 0)) for c in configs}
        timings = _run(work, configs, steps, args, device)
        rows += _rows(work, timings, configs)
        recorded += _recorded(work, timings, configs)
    report.table(HEADER, rows)
    for what, why in FAILED.items():
        report.note(f"- {what} failed to start: {why}")
    report.note("\nWhat each monitor recorded (read back after the run):")
    report.table(["workload", "config", "recorded"], recorded)
    return alone


HEADER = ["workload", "config", "steps", "median ms", "ratio", "mean ms", "mean ratio"]


def _run(
    work: Workload,
    configs: list[str],
    steps: dict[str, int],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Timing]:
    start = time.perf_counter()
    timings = interleaved(work, configs, steps, args.warmup, device)
    print(
        f"  ({work.name}, {len(configs)} configurations: {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return timings


def _rows(work: Workload, timings: dict[str, Timing], configs: list[str]) -> list[list[str]]:
    rows = []
    for config in [c for c in configs if c in timings]:
        med, mratio, mean, aratio = ratios(timings, config)
        rows.append(
            [
                work.name,
                config,
                str(len(timings[config].times)),
                f"{med:.2f}",
                f"{mratio:.3f}",
                f"{mean:.2f}",
                f"{aratio:.3f}",
            ]
        )
    return rows


def _recorded(work: Workload, timings: dict[str, Timing], configs: list[str]) -> list[list[str]]:
    return [
        [work.name, c, timings[c].recorded] for c in configs if c in timings and timings[c].recorded
    ]


def flush_section(report: Report, results: dict[str, dict[str, Timing]]) -> None:
    report.section(
        "Window flush cost (actmon monitor.step())",
        "flush: median monitor.step() on window-ending steps (log_every=20): one device-to-host"
        " copy, Snapshot, rules, hand-over to the sink threads; other: the other steps.",
    )
    rows = []
    for name, timings in results.items():
        for config in ACTMON_CONFIGS:
            times = timings[config].monitor.step_times
            flushes = [t for t, f in times if f]
            others = [t for t, f in times if not f]
            if not flushes or not others:
                continue
            flush, other = statistics.median(flushes), statistics.median(others)
            step = statistics.median(timings["none"].times.values())
            rows.append(
                [
                    WORKLOADS[name].name,
                    config,
                    str(len(flushes)),
                    f"{flush * 1e3:.2f}",
                    f"{other * 1e6:.0f}",
                    f"{(flush - other) / 10 * 1e3:.3f}",
                    f"{(flush - other) / 10 / step * 100:.1f}",
                ]
            )
    report.table(
        [
            "workload",
            "config",
            "flushes",
            "flush ms",
            "other step() µs",
            "amortised ms/step",
            "% of a step",
        ],
        rows,
    )


def memory_probe(spec: str, steps: int, device: torch.device) -> None:
    """Child process: one configuration alone; prints its RSS figures as JSON."""
    import psutil

    name, config = spec.split(":")
    work = WORKLOADS[name]
    torch.manual_seed(0)
    model = work.make_model().to(device)
    opt = work.make_optimizer(model)
    monitor = make_monitor(config, model, opt)
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(t.to(device) for t in work.make_batch(gen)) for _ in range(4)]
    setup = psutil.Process().memory_info().rss / 2**20
    for i in range(steps):
        loss = train_step(work, model, opt, batches[i % 4])
        if monitor is not None:
            monitor.after_step(i, loss)
    _sync(device)
    end = psutil.Process().memory_info().rss / 2**20
    peak = _peak_rss_mb()
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    if monitor is not None:
        monitor.close()
    print(json.dumps({"setup": setup, "end": end, "peak": peak, "gpu_peak": gpu}))


def memory_section(
    report: Report, args: argparse.Namespace, peers: list[str], device: torch.device
) -> None:
    repeats = max(1, args.memory_repeats)
    report.section(
        "Peak RSS: fresh subprocesses, interleaved rounds",
        f"Each configuration runs alone in a fresh process for {args.memory_steps} steps (with"
        " the defaults: actmon's first window flush and its first sampled step, with the"
        " transient parameter copy of the update ratio)."
        f" No monitor and actmon's configurations run {repeats} times each, in rounds of one"
        " process per configuration in a freshly shuffled order; peers once. A single process's"
        " peak moves by tens of MB on its own (glibc's heap), so the figures are medians."
        " peak: the median of the processes' peak RSS (VmHWM), imports included; range: the"
        " lowest and highest peak; Δ none: median peak minus the no-monitor median; growth:"
        " median of peak minus RSS after set-up (model, optimizer, monitor built, before the"
        " first step).",
    )
    rows = []
    for name in args.workloads:
        configs = ["none", *ACTMON_CONFIGS, *peers]
        runs = {c: repeats if c == "none" or c in ACTMON_CONFIGS else 1 for c in configs}
        probes: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
        failed: dict[str, str] = {}
        for round_ in range(repeats):
            order = [c for c in configs if round_ < runs[c] and c not in failed]
            random.shuffle(order)
            for config in order:
                result = _probe_memory(name, config, args)
                if isinstance(result, str):
                    failed[config] = result
                    continue
                probes[config].append(result)
                print(f"  {name}:{config} peak {result['peak']:.0f} MB", flush=True)
        base = statistics.median(m["peak"] for m in probes["none"]) if probes["none"] else None
        for config in configs:
            if config in failed:
                rows.append([WORKLOADS[name].name, config, "failed: " + failed[config]])
                continue
            peaks = [m["peak"] for m in probes[config]]
            peak = statistics.median(peaks)
            delta = pct = ""
            if base is not None and config != "none":
                delta, pct = f"{peak - base:+.0f}", f"{(peak / base - 1) * 100:+.1f}"
            row = [
                WORKLOADS[name].name,
                config,
                str(len(peaks)),
                f"{peak:.0f}",
                f"{min(peaks):.0f}-{max(peaks):.0f}",
                delta,
                pct,
                f"{statistics.median(m['peak'] - m['setup'] for m in probes[config]):.0f}",
            ]
            if device.type == "cuda":
                row.append(f"{statistics.median(m['gpu_peak'] for m in probes[config]):.0f}")
            rows.append(row)
    header = [
        "workload",
        "config",
        "runs",
        "peak RSS MB",
        "range MB",
        "Δ none MB",
        "Δ none %",
        "growth MB",
    ]
    if device.type == "cuda":
        header.append("peak CUDA MB")
    rows = [r + [""] * (len(header) - len(r)) if len(r) < len(header) else r for r in rows]
    report.table(header, rows)


def _probe_memory(name: str, config: str, args: argparse.Namespace) -> dict[str, float] | str:
    """One fresh process training ``name`` under ``config``: its RSS figures, or why it failed."""
    cmd = [
        sys.executable,
        __file__,
        "--probe-memory",
        f"{name}:{config}",
        "--memory-steps",
        str(args.memory_steps),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return " / ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
    result: dict[str, float] = json.loads(lines[-1])
    return result


def scaling_section(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    report.section(
        "Layer scaling: deep MLPs of width 32, batch 64",
        "Each depth interleaves none / default / full in one process. Per-layer cost: the"
        " least-squares slope of (config - none) step time against the number of blocks"
        " (Linear + ReLU: two monitored modules each).",
    )
    rows = []
    overhead: dict[str, list[tuple[int, float, float]]] = {c: [] for c in ACTMON_CONFIGS}
    configs = ["none", *ACTMON_CONFIGS]
    for blocks in args.blocks:
        work = deep_workload(blocks)
        steps = {c: args.scaling_steps for c in configs}
        timings = interleaved(work, configs, steps, args.warmup, device)
        none_med, none_mean = ratios(timings, "none")[0], ratios(timings, "none")[2]
        rows.append([str(blocks), "none", f"{none_med:.2f}", "1.000", f"{none_mean:.2f}", "1.000"])
        for config in ACTMON_CONFIGS:
            med, mratio, mean, aratio = ratios(timings, config)
            overhead[config].append((blocks, med - none_med, mean - none_mean))
            rows.append(
                [str(blocks), config, f"{med:.2f}", f"{mratio:.3f}", f"{mean:.2f}", f"{aratio:.3f}"]
            )
    report.table(["blocks", "config", "median ms", "ratio", "mean ms", "mean ratio"], rows)
    slopes = []
    for config, points in overhead.items():
        if len(points) < 2:
            continue
        xs = [float(b) for b, _, _ in points]
        med = statistics.linear_regression(xs, [m for _, m, _ in points])
        mean = statistics.linear_regression(xs, [a for _, _, a in points])
        slopes.append(
            [
                config,
                f"{med.slope * 1e3:.1f}",
                f"{mean.slope * 1e3:.1f}",
                f"{mean.slope * 1e3 / 2:.1f}",
                f"{mean.intercept:.2f}",
            ]
        )
    report.table(
        [
            "config",
            "µs/block/step (median)",
            "µs/block/step (mean)",
            "µs/module/step (mean)",
            "intercept ms (mean)",
        ],
        slopes,
    )


def soak_section(report: Report, args: argparse.Namespace) -> None:
    report.section(
        f"Soak: benchmarks/soak.py --steps {args.soak_steps}",
        "A small MLP with a window every step (log_every=1, sample_every=1, the store on):"
        " RSS, live tensors, threads and file descriptors should be flat after warm-up.",
    )
    every = max(1, args.soak_steps // 8)
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "soak.py"),
            "--steps",
            str(args.soak_steps),
            "--every",
            str(every),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    report.code((out.stdout + (out.stderr if out.returncode else "")).strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default="timing,flush,memory,scaling,soak",
        help="comma-separated sections (default: all)",
    )
    parser.add_argument("--workloads", default="mlp,conv,gpt2")
    parser.add_argument(
        "--peers",
        default="all",
        help=f"'all' (those installed), 'none', or a list of: {', '.join(PEERS)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"measured steps per configuration (default per workload: {STEPS})",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-steps", type=int, default=12)
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=5,
        help="fresh processes per configuration for no monitor and actmon (peers: one)",
    )
    parser.add_argument("--scaling-steps", type=int, default=40)
    parser.add_argument("--blocks", default=",".join(map(str, SCALING_BLOCKS)))
    parser.add_argument("--soak-steps", type=int, default=2000)
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)  # child process: name:config
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = torch.device(args.device)
    if args.probe_memory:
        memory_probe(args.probe_memory, args.memory_steps, device)
        return
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.blocks = [int(b) for b in args.blocks.split(",") if b]
    sections = set(args.only.split(","))
    report = Report()
    header = (
        f"torch {torch.__version__}, {args.threads} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; {machine()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; actmon at"
        f" {revision()}"
    )
    command = "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    print(header)
    if "gpt2" in args.workloads and available_transformers() is not None:
        print(f"skipping gpt2: {available_transformers()}")
        args.workloads.remove("gpt2")
    wanted = (
        list(PEERS)
        if args.peers == "all"
        else [p for p in args.peers.split(",") if p and p != "none"]
    )
    peers = []
    skipped = []
    for peer in wanted:
        why = available(peer)
        if why is None:
            peers.append(peer)
        else:
            skipped.append(f"- {peer}: skipped, {why}")
    report.section("Configurations")
    report.table(
        ["config", "what"],
        [[c, CONFIG_DESCRIPTIONS[c]] for c in ["none", *ACTMON_CONFIGS]]
        + [[p, DESCRIPTIONS[p]] for p in peers],
    )
    for line in skipped:
        report.note(line)
    results = {}
    if "timing" in sections or "flush" in sections:
        results = timing_section(report, args, peers if "timing" in sections else [], device)
    if "flush" in sections:
        flush_section(report, results)
    if "scaling" in sections:
        scaling_section(report, args, device)
    if "memory" in sections:
        memory_section(report, args, peers, device)
    if "soak" in sections and device.type == "cpu":
        soak_section(report, args)
    if args.markdown:
        body = f"Made by `{command}`\n\n{header}\n" + "".join(report.parts)
        write_markdown(args.markdown, device.type, body)
        print(f"\nwritten to {args.markdown}")


def write_markdown(path: Path, key: str, body: str) -> None:
    """Put ``body`` between this device type's markers in ``path``, keeping everything else
    (the other device's section, hand-written notes), so each run rewrites only its own part."""
    begin, end = f"<!-- overhead.py {key} begin -->", f"<!-- overhead.py {key} end -->"
    title = "CPU" if key == "cpu" else key.upper()
    block = f"{begin}\n# {title} results\n\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# actmon benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def revision() -> str:
    """The checkout's commit, marked when actmon/ has changes not committed."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=HERE.parent, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = (
            " (with uncommitted changes to actmon/)"
            if run("status", "--porcelain", "actmon")
            else ""
        )
        return run("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"


def available_transformers() -> str | None:
    try:
        import transformers  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    main()
