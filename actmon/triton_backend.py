"""The GPU kernel backend: one Triton launch per hook call, added straight into window rows.

What the CPU's fused C kernels do for a CPU tensor (``stats.accumulate_activation``), these do
for a CUDA tensor: one launch reads the tensor once, in its own dtype (float32, bfloat16 or
float16: no float32 copy is made), and adds every statistic into the layer's rows of the
window buffers with atomics: sums (float64), extrema (float32, NaN kept), the zero and
saturated counts, the bit-pattern histogram (each program bins its tiles into a block-local
histogram, merged with one atomic per non-empty bin), the linear histogram of bounded kinds,
the step's per-unit maxima, and the call's non-finite count (for the first offender). A
gradient call adds its sum of squares, extrema, NaN/Inf counts and (when on) histogram.

Counts and histograms are those of the torch-op kernels bit for bit (the same float32 bit
patterns, the same float32 comparisons); sums differ in rounding only.

Triton is imported lazily, at the first tensor this backend is asked about, and only where it
could take it: CUDA tensors by default. ``ACTMON_TRITON`` (read at import into :data:`MODE`)
chooses: ``auto`` (default: CUDA tensors when triton imports), ``0`` (never: the torch-op
kernels), ``force`` (CPU tensors too, instead of the fused C kernels: for tests on a machine
without a GPU; needs ``TRITON_INTERPRET=1``, Triton's interpreter).
:data:`LAUNCHES` counts this backend's kernel launches by kind, so tests can hold it to one
per hook call.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

MODES = ("auto", "0", "force")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT32_LIMIT = 2**31 - 1
_HALF = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' HALF
TILE = 4096  # elements per tile; each program loops over tiles
LAUNCHES: Counter[str] = Counter()  # "activation" / "gradient": launches since import


# The switch, read once at import (tests set the attribute); checked at the first decision.
MODE = os.environ.get("ACTMON_TRITON", "auto").strip().lower() or "auto"


def mode() -> str:
    """:data:`MODE`, checked: a clear error for a value that is not allowed."""
    value = MODE
    if value not in MODES:
        allowed = ", ".join(MODES)
        raise ValueError(f"ACTMON_TRITON is {value!r}; allowed values are {allowed}")
    if value == "force" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "ACTMON_TRITON=force runs the Triton kernels on CPU tensors, which needs Triton's"
            " interpreter: set TRITON_INTERPRET=1 as well"
        )
    return value


@lru_cache(maxsize=1)
def _triton() -> ModuleType | None:
    """Triton, imported at first need; None where it is not installed or does not import."""
    try:
        import triton
    except Exception:  # ImportError, or a broken install: the torch-op kernels instead
        return None
    return triton


def enabled_for(device: torch.device) -> bool:
    """Whether window buffers on ``device`` take this backend's in-place calls."""
    if device.type == "cpu" and MODE != "force":  # the common CPU case: no import, no check
        return False
    chosen = mode()
    if chosen == "0" or device.type not in ("cuda", "cpu"):
        return False
    return _triton() is not None


def takes(x: Tensor) -> bool:
    """Whether one launch can summarise ``x``: on an enabled device, a dtype it reads, dense
    (any permutation of a contiguous layout, channels-last included), at most 2**31-1 elements."""
    return (
        x.dtype in DTYPES
        and x.layout is torch.strided
        and 0 < x.numel() <= INT32_LIMIT
        and enabled_for(x.device)
        and memory_order(x) is not None
    )


def memory_order(x: Tensor) -> list[int] | None:
    """The axes of ``x`` from outermost to innermost in memory, if ``x`` is a permutation of a
    contiguous tensor (no gaps, no overlap); else None."""
    if x.is_contiguous():
        return list(range(x.dim()))
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.shape[d]), reverse=True)
    expected = 1
    for d in reversed(order):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return None
        expected *= x.shape[d]
    return order


def geometry(x: Tensor, unit_axis: int | None) -> tuple[int, int, int]:
    """(outer, units, inner): ``x`` read in memory order as [outer, units, inner]."""
    if unit_axis is None:
        return 1, 1, x.numel()
    order = memory_order(x)
    assert order is not None
    k = order.index(unit_axis)
    shape = x.shape
    outer = math.prod(shape[d] for d in order[:k])
    inner = math.prod(shape[d] for d in order[k + 1 :])
    return outer, shape[unit_axis], inner


class ForwardRows(NamedTuple):
    """One forward call's destinations (``Aggregator.forward_addresses`` on a device buffer):
    views of the layer's rows, and the call's position in the step's call order."""

    sums: Tensor  # float64 [sum, sumsq, ...] +=
    maxes: Tensor  # float32 [max, -min] max=
    counts: Tensor  # int64 [nonzero, saturated] +=
    hist: Tensor  # int64 [2048] +=
    units: Tensor | None  # float32 [units]: the step's per-unit maxima, max=
    linear: Tensor  # int64 [linear bins + 1] +=
    call_counts: Tensor  # int64 per call of the step: non-finite elements +=
    position: int


class BackwardRows(NamedTuple):
    """One output-gradient call's destinations: views of the layer's rows."""

    sums: Tensor  # float64 [sum of squares, non-finite, NaN] +=
    maxes: Tensor  # float32 [max, -min] max=
    hist: Tensor | None  # int64 [2048] +=, or None when gradient histograms are off


def _programs(device: torch.device, tiles: int) -> int:
    """Programs per launch: enough to fill the device; each merges its tiles locally first."""
    if device.type == "cuda":
        return max(1, min(tiles, 4 * _sm_count(device.index)))
    return max(1, min(tiles, 4))  # the interpreter: a few, so the tile loop and merges run


@lru_cache(maxsize=16)
def _sm_count(index: int | None) -> int:
    return int(torch.cuda.get_device_properties(index or 0).multi_processor_count)


def _tiles(units_mode: int, rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a [rows, cols] read: columns as wide as the units (mode 1) or the
    inner extent (mode 2) up to 1024, rows to make a tile of :data:`TILE` elements."""
    if units_mode == 0:
        return TILE // 1024, 1024
    block_c = min(1024, triton_next_pow2(cols))
    return max(1, TILE // block_c), block_c


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def activation_into(
    x: Tensor,
    rows: ForwardRows,
    unit_axis: int | None,
    saturation: tuple[int, float, float],
    linear: tuple[int, float, float],
) -> None:
    """Add one activation's statistics into ``rows`` with one launch.

    ``saturation`` = (mode: 0 none, 1 tanh ``|v| > hi``, 2 sigmoid ``v < lo or v > hi``,
    3 clipping ``v <= lo or v >= hi``, lo, hi); ``linear`` = (bins, low, scale) with bins 0
    for none: bin ``floor((v - low) * scale)`` clamped to [0, bins - 1], NaN in bin ``bins``.
    """
    kernels = _kernels()
    n = x.numel()
    outer, units, inner = geometry(x, unit_axis if rows.units is not None else None)
    if rows.units is None:
        units_mode, r, c = 0, -(-n // 1024), 1024
    elif inner == 1:
        units_mode, r, c = 1, outer, units
    else:
        units_mode, r, c = 2, outer * units, inner
    block_r, block_c = _tiles(units_mode, r, c)
    tiles = -(-r // block_r) * -(-c // block_c)
    grid = (_programs(x.device, tiles),)
    sat_mode, lo, hi = saturation
    bins, low, scale = linear
    unit_row = rows.units if rows.units is not None else rows.maxes  # unused when mode 0
    with _on(x.device):
        kernels.activation[grid](
            x,
            n,
            r,
            c,
            units,
            rows.sums,
            rows.maxes,
            rows.counts,
            rows.hist,
            unit_row,
            rows.linear,
            rows.call_counts,
            rows.position,
            lo,
            hi,
            low,
            scale,
            UNITS=units_mode,
            SAT=sat_mode,
            LIN_BINS=bins,
            LIN_BLOCK=triton_next_pow2(bins + 1) if bins else 1,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            HALF=_HALF[x.dtype],
            num_warps=8,
        )
    LAUNCHES["activation"] += 1


def gradient_into(g: Tensor, rows: BackwardRows) -> None:
    """Add one output gradient's statistics into ``rows`` with one launch."""
    kernels = _kernels()
    n = g.numel()
    tiles = -(-n // TILE)
    grid = (_programs(g.device, tiles),)
    hist = rows.hist if rows.hist is not None else rows.sums  # unused without HIST
    with _on(g.device):
        kernels.gradient[grid](
            g,
            n,
            rows.sums,
            rows.maxes,
            hist,
            HIST=rows.hist is not None,
            BLOCK=TILE,
            HALF=_HALF[g.dtype],
            num_warps=8,
        )
    LAUNCHES["gradient"] += 1


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    """Where a launch runs: Triton launches on the current CUDA device, which need not be the
    tensor's (a rank that never called set_device); made current for the launch.

    Triton's interpreter (CPU tensors) computes with numpy, which warns where IEEE float
    arithmetic overflows to Inf or makes NaN: what the kernels mean, so not a warning here."""
    if device.type == "cuda":
        if device.index is None or device.index == torch.cuda.current_device():
            yield
        else:
            with torch.cuda.device(device.index):
                yield
        return
    import numpy as np

    with np.errstate(all="ignore"):
        yield


@lru_cache(maxsize=1)
def _kernels() -> Any:
    """The jitted kernels, defined at first use (``triton.jit`` needs triton imported)."""
    from actmon import _triton_kernels

    return _triton_kernels
