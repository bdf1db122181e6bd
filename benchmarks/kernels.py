"""The per-tensor statistics kernels alone: ns per element of the fused C pass against actmon's
torch-op kernels on the same tensor, in the same run.

    python benchmarks/kernels.py [--threads 2] [--repeats 50]

Each row summarises one warm tensor the way a CPU hook does: the fused pass adds into window
rows; without the extension, the torch-op kernels write slot rows. An activation gets all its
statistics and the histogram, with per-unit maxima where the kind tracks units (units last, or
on axis 1 of feature maps from 32x32 down to 4x4); an output gradient is summarised with and
without its histogram. "relu'd" tensors are half zeros, as ReLU outputs and their gradients
are. Printed: the fused pass on one thread and on ``--threads``, the torch-op kernels on
``--threads``, and their ratio. Nothing here is asserted: these are measurements (the tests
check that both give the same numbers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # actmon from this checkout
from actmon import stats
from actmon.kinds import Kind, KindInfo

# (what, shape, unit axis or None): W1's, W2's and W3's shapes among them.
ACTIVATIONS = [
    ("flat", (8, 128, 1024), None),
    ("units last", (128, 512), 1),
    ("units last", (8, 128, 1024), 2),
    ("maps 32x32", (32, 32, 32, 32), 1),
    ("maps 8x8", (32, 128, 8, 8), 1),
    ("maps 4x4", (32, 128, 4, 4), 1),
]
GRADIENTS = [(128, 512), (8, 128, 1024)]


def _spec(shape: tuple[int, ...], axis: int | None) -> stats.ActivationSpec:
    return stats.ActivationSpec(
        info=KindInfo(Kind.RELU),
        unit_axis=axis,
        reduce_dims=tuple(d for d in range(len(shape)) if d != axis) if axis is not None else (),
        saturation_eps=0.01,
        linear_bins=0,
        softmax_dim=None,
    )


def _seconds(call: Callable[[], object], repeats: int) -> float:
    """Median seconds of one call, warm (every call after a few unmeasured ones)."""
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _activation_calls(
    x: torch.Tensor, spec: stats.ActivationSpec
) -> tuple[Callable[[], object], Callable[[], object]]:
    """What a hook runs for one activation: with the extension, the fused pass adding into
    window rows; without it, the torch-op kernels writing slot rows."""
    # One layer's rows of the aggregator's window buffers, shaped as it makes them.
    act_sum = torch.zeros(len(stats.ACT_SUM_FIELDS), dtype=torch.float64)
    act_max, act_count = torch.zeros(2), torch.zeros(2, dtype=torch.int64)
    act_hist = torch.zeros(stats.SYMLOG_BINS, dtype=torch.int64)
    unit_max = torch.full((x.shape[spec.unit_axis],), -torch.inf) if spec.unit_axis else None
    window = [t.data_ptr() for t in (act_sum, act_max, act_count, act_hist)]
    window.append(unit_max.data_ptr() if unit_max is not None else 0)
    sums, maxes = torch.zeros(4, dtype=torch.float64), torch.zeros(2)
    counts = torch.zeros(2, dtype=torch.int32)
    slots = (sums.unbind(0), maxes.unbind(0), counts.unbind(0))
    scratch = stats.Scratch()

    def torch_ops() -> object:
        fused, stats.FUSED = stats.FUSED, None
        try:
            with torch.no_grad():
                return stats.summarize_activation(x, spec, *slots, scratch)
        finally:
            stats.FUSED = fused

    held = (act_sum, act_max, act_count, act_hist, unit_max)  # alive while the calls run

    def fused() -> object:
        assert held
        return stats.accumulate_activation(x, spec, window)

    return fused, torch_ops


def _gradient_calls(
    g: torch.Tensor, with_hist: bool
) -> tuple[Callable[[], object], Callable[[], object]]:
    """The same for one output gradient."""
    grad_sum = torch.zeros(len(stats.GRAD_SUM_FIELDS), dtype=torch.float64)
    grad_max, grad_hist = torch.zeros(2), torch.zeros(stats.SYMLOG_BINS, dtype=torch.int64)
    window = [grad_sum.data_ptr(), grad_max.data_ptr(), grad_hist.data_ptr() if with_hist else 0]
    sums, maxes = torch.zeros(3), torch.zeros(2)
    slots = (sums.unbind(0), maxes.unbind(0))
    scratch = stats.Scratch()

    def torch_ops() -> object:
        fused, stats.FUSED = stats.FUSED, None
        try:
            with torch.no_grad():
                return stats.summarize_gradient(g, *slots, with_hist, scratch)
        finally:
            stats.FUSED = fused

    held = (grad_sum, grad_max, grad_hist)

    def fused() -> None:
        assert held
        stats.accumulate_gradient(g, window)

    return fused, torch_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if stats.FUSED is None:
        sys.exit("actmon._fused is not built (pip install -e . with a C compiler)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    isa = stats.FUSED.isa()
    print(f"torch {torch.__version__}, fused kernels: {isa}, up to {args.threads} threads")
    threaded = f"fused {args.threads}t"
    print(f"ns per element, median of {args.repeats} warm calls; ratio: torch ops / fused")
    print(f"{'tensor':44} {'fused 1t':>9} {threaded:>9} {'torch ops':>10} {'ratio':>6}")
    rows: list[tuple[str, tuple[Callable[[], object], Callable[[], object]], int]] = []
    for what, shape, axis in ACTIVATIONS:
        dense = torch.randn(shape)
        for name, x in (("dense", dense), ("relu'd", dense.relu())):
            label = f"activation {what} {tuple(shape)} {name}"
            rows.append((label, _activation_calls(x, _spec(shape, axis)), x.numel()))
    for shape in GRADIENTS:
        g = torch.randn(shape)
        for with_hist in (False, True):
            label = f"gradient {tuple(shape)} {'with' if with_hist else 'no'} histogram"
            rows.append((label, _gradient_calls(g, with_hist), g.numel()))
    default_threads = stats.FUSED_THREADS
    for label, (fused, torch_ops), n in rows:
        stats.FUSED_THREADS = 1
        one = _seconds(fused, args.repeats)
        stats.FUSED_THREADS = args.threads
        many = _seconds(fused, args.repeats)
        stats.FUSED_THREADS = default_threads
        plain = _seconds(torch_ops, args.repeats)
        ns = [t / n * 1e9 for t in (one, many, plain)]
        print(f"{label:44} {ns[0]:9.3f} {ns[1]:9.3f} {ns[2]:10.3f} {plain / many:6.1f}")


if __name__ == "__main__":
    main()
