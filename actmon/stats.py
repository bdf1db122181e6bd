"""Stats kernels: one tensor in, fixed-size results out, written straight into device slots.

Every kernel works in float32 whatever the input dtype, makes one pass per statistic, never
calls ``.item()`` or anything else that waits for the device, and keeps no reference to the
tensor it summarised. Results land in caller-owned slot rows through ``out=`` so a call costs
no extra copy; the aggregator folds the slots into window buffers once per step. On a CPU the
fused kernels instead add a call straight into the layer's window rows (``accumulate_*``).

The histogram bins a value by its float32 bit pattern: ``bits >> 21`` keeps the sign, the 8
exponent bits and the top 2 mantissa bits, i.e. 4 bins per power of two, on fixed edges that
merge exactly across calls, steps, windows and ranks. The same index gives exact NaN and +-Inf
counts (their exponent is all ones), so no separate ``isnan``/``isinf`` pass is needed.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from actmon import triton_backend
from actmon.errors import HookError
from actmon.kinds import Kind, KindInfo

SYMLOG_SHIFT = 21
SYMLOG_BINS = 2048  # raw device bins: index = (int32 bits >> 21) + 1024
HALF = SYMLOG_BINS // 2
# Magnitude bin j = |bits| >> 21 lies at index HALF + j for x >= +0 and at index j for x <= -0.
INF_J = 1020  # exponent 255, mantissa top bits 00: +-Inf
NAN_J = (1021, 1022, 1023)  # exponent 255 with the quiet bit set: NaN (every NaN arithmetic makes)
POS_INF_BIN = HALF + INF_J
NEG_INF_BIN = INF_J
NAN_BINS = tuple(HALF + j for j in NAN_J) + NAN_J
NONFINITE_BINS = (POS_INF_BIN, NEG_INF_BIN, *NAN_BINS)

ACT_SUM_FIELDS = ("sum", "sumsq", "softmax_max_prob_sum", "softmax_entropy_sum")
ACT_MAX_FIELDS = ("max", "neg_min")  # the min column is negated in bulk so one amax folds both
ACT_COUNT_FIELDS = ("nonzero", "saturated")
GRAD_SUM_FIELDS = ("sumsq", "nonfinite", "nan")
GRAD_MAX_FIELDS = ("max", "neg_min")

INT32_LIMIT = 2**31 - 1  # elements per tensor (the kernels count in int32)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _load_fused() -> ModuleType | None:
    """The optional one-pass CPU kernels (actmon/_fused.c), unless ACTMON_FUSED=0."""
    if os.environ.get("ACTMON_FUSED", "1") == "0":
        return None
    try:
        from actmon import _fused  # type: ignore[attr-defined]
    except ImportError:  # built without a C compiler: the torch-op kernels below
        return None
    return _fused  # type: ignore[no-any-return]


# CPU tensors go through one fused pass when available; CUDA tensors through the Triton
# backend (actmon/triton_backend.py) when triton imports; others (and non-contiguous
# tensors) use the torch-op kernels. All give the same counts; sums differ in rounding only.
FUSED: ModuleType | None = _load_fused()

_SATURATION_MODES = {Kind.TANH: 1, Kind.SIGMOID: 2, Kind.CLIPPING: 3}


def _shares_torch_openmp(fused: ModuleType | None) -> bool:
    """Whether the fused kernels' OpenMP runtime is the one torch uses.

    Then a split pass runs on torch's own OpenMP workers, which sit idle (spinning) between
    torch's ops; a second runtime's threads would compete with them instead (on 2 cores that
    halved the speed). Same runtime: our ``omp_get_max_threads`` is the function libtorch_cpu's
    resolves to. Other libraries may map OpenMP runtimes of their own (scikit-learn vendors a
    libgomp); that does not matter. Unknown (not Linux, another torch layout): not shared.
    """
    ours = fused.openmp() if fused is not None else None
    if ours is None:
        return False
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        loaded = ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD)  # the copy torch loaded
        theirs = ctypes.cast(loaded.omp_get_max_threads, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    return bool(theirs == ours)


# Threads per fused pass: ACTMON_FUSED_THREADS if set; else torch's thread count when the
# OpenMP runtime is shared with torch, one otherwise (see _shares_torch_openmp).
_THREADS_ENV = os.environ.get("ACTMON_FUSED_THREADS")
FUSED_THREADS: int | None = int(_THREADS_ENV) if _THREADS_ENV else None
_SHARED_OPENMP = _shares_torch_openmp(FUSED)


def fused_threads() -> int:
    """Threads the next fused pass may use (passes below 2**15 elements use one)."""
    if FUSED_THREADS is not None:
        return FUSED_THREADS
    return torch.get_num_threads() if _SHARED_OPENMP else 1


class Scratch:
    """Reusable temporaries for the kernels' element-wise steps.

    A fresh multi-megabyte tensor per call costs page faults on a CPU (its allocator does not
    cache), which made temporaries cost more than the arithmetic. Buffers grow to the largest
    tensor seen, up to ``limit`` elements; beyond that a call allocates as usual.
    """

    def __init__(self, limit: int = 1 << 25) -> None:
        self.limit = limit
        self._buffers: dict[tuple[torch.dtype, torch.device, int], Tensor] = {}

    def get(self, n: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> Tensor:
        if n > self.limit:
            return torch.empty(n, dtype=dtype, device=device)
        key = (dtype, device, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1024), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:n]


@dataclass(frozen=True)
class ActivationSpec:
    """What to compute for one layer's output of one rank (ndim) and unit axis."""

    info: KindInfo
    unit_axis: int | None  # non-negative axis, or None when units are not tracked
    reduce_dims: tuple[int, ...]  # every axis but the unit axis
    saturation_eps: float
    linear_bins: int  # equal-width bins for bounded kinds (0: none)
    softmax_dim: int | None  # resolved, non-negative


def as_float32(t: Tensor, what: str) -> Tensor | None:
    """The detached float32 tensor to summarise, or None for an empty tensor.

    A bfloat16 or float16 tensor the device backend takes is returned as it is: its kernels
    read that dtype and convert in registers, so no float32 copy is made (the torch-op kernels
    convert it themselves). Raises HookError for anything that cannot be summarised (sparse,
    complex, integer, bool).
    """
    if t.layout is not torch.strided:
        raise HookError(
            f"{what} has layout {t.layout}; only dense (strided) tensors are summarised"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise HookError(f"{what} has dtype {t.dtype}; supported dtypes are {allowed}")
    if t.numel() == 0:
        return None
    if t.numel() > INT32_LIMIT:
        raise HookError(f"{what} has {t.numel()} elements; at most {INT32_LIMIT} are supported")
    # Callers run kernels under torch.no_grad(), so no detach() (one dispatcher call) is needed.
    if t.dtype is torch.float32 or (t.dtype is not torch.float64 and triton_backend.takes(t)):
        return t
    return t.float()


def flat_view(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (no copy for channels-last or transposes)."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    if permuted.is_contiguous():
        return permuted.view(-1)
    return t.reshape(-1)


def bincount(index: Tensor, bins: int) -> Tensor:
    """Counts of each value of a 1-D integer index in ``[0, bins)`` as int64, without a host sync.

    ``torch.bincount`` on CUDA reads the index maximum back to the host, so other devices
    scatter-add instead; both give the same counts.
    """
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=bins)
    return scatter_bincount(index, bins)


def scatter_bincount(index: Tensor, bins: int) -> Tensor:
    """Device-generic counting by scatter-add (what non-CPU devices use)."""
    out = torch.zeros(bins, dtype=torch.int64, device=index.device)
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel())
    return out.scatter_add_(0, index.long(), ones)


def symlog_index(flat: Tensor, out: Tensor | None = None) -> Tensor:
    """Raw histogram index in ``[0, 2048)`` of every element of a 1-D float32 tensor."""
    bits = flat.view(torch.int32)
    if out is None:
        return (bits >> SYMLOG_SHIFT).add_(HALF)
    return torch.bitwise_right_shift(bits, SYMLOG_SHIFT, out=out).add_(HALF)


_FUSED_NORMS_LIMIT = 1 << 24  # elements; beyond this torch's threaded norms win


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor, as one 1-D tensor on their device (no host read).

    CPU float32 tensors go through one fused call (the gradient-norm sentinel runs every step,
    and torch._foreach_norm's per-tensor dispatch dominates for many small parameters).
    """
    if FUSED is not None and tensors and tensors[0].device.type == "cpu":
        addresses, sizes = [], []
        for t in tensors:  # one walk: the sentinel calls this every step
            if t.dtype is not torch.float32 or not t.is_contiguous():
                break
            addresses.append(t.data_ptr())
            sizes.append(t.numel())
        else:
            if sum(sizes) <= _FUSED_NORMS_LIMIT:
                out = torch.empty(len(sizes), dtype=torch.float32)
                FUSED.norms(addresses, sizes, out.data_ptr(), fused_threads())
                return out
    return torch.stack(torch._foreach_norm(list(tensors)))


def unscale_hist(hists: Tensor, scale: Tensor) -> Tensor:
    """Raw histograms (..., 2048) of ``x * scale`` moved to the bins of ``x`` (on the device).

    Multiplying by 2**e moves a normal float exactly 4*e bins up, so for GradScaler's
    power-of-two scales this is exact; other scales round to the nearest bin. Zero, NaN and
    Inf bins stay; values that would fall below the smallest bin land in the zero bin.
    """
    device = hists.device
    shift = torch.log2(scale.reshape(()).float()).mul(4).round().long()
    j = torch.arange(HALF, device=device)
    finite = (j > 0) & (j < INF_J)
    moved = torch.where(finite, (j - shift).clamp(0, INF_J - 1), j)
    dest = torch.cat([moved, moved + HALF])
    return torch.zeros_like(hists).index_add_(hists.dim() - 1, dest, hists)


def summarize_activation(
    x: Tensor,
    spec: ActivationSpec,
    sums: Sequence[Tensor],
    maxes: Sequence[Tensor],
    counts: Sequence[Tensor],
    scratch: Scratch,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summarise a float32 activation into slot rows and return the variable-size parts.

    The slots are 0-d tensors written with ``out=``: ``sums`` = [sum, sum of squares, softmax
    max-prob sum, softmax entropy sum] (float64), ``maxes`` = [max, min] (the aggregator
    negates min), ``counts`` = [nonzero, saturated] (int32). Run it under ``torch.no_grad()``.
    Returns (raw histogram (2048,) int64, per-unit max (units,) or None, linear histogram or None).
    """
    if x.dtype is not torch.float32:  # a half-precision tensor the device backend would take
        x = x.float()
    if FUSED is not None and c_fusable(x):
        hist, unit_max = _fused_activation(FUSED, x, spec, sums, maxes, counts)
    else:
        hist, unit_max = _torch_activation(x, spec, sums, maxes, counts, scratch)
    if spec.info.kind is Kind.SOFTMAX and spec.softmax_dim is not None:
        _softmax_stats(x, spec, sums)
    return hist, unit_max, _linear_hist(flat_view(x), spec, scratch) if spec.linear_bins else None


def linear_hist(x: Tensor, spec: ActivationSpec, scratch: Scratch) -> Tensor | None:
    """The equal-width histogram of a bounded kind's output after ``accumulate_activation``,
    or None for other kinds and where the device backend's launch already added it."""
    if not spec.linear_bins or triton_backend.enabled_for(x.device):
        return None
    return _linear_hist(flat_view(x), spec, scratch)


def fusable(x: Tensor) -> bool:
    """Whether one in-place kernel call takes this tensor (``accumulate_*``): the device
    backend's where it is on for the tensor's device, else the fused C kernels'."""
    if triton_backend.enabled_for(x.device):
        return triton_backend.takes(x)
    return c_fusable(x)


def c_fusable(x: Tensor) -> bool:
    """Whether the fused C kernels take this tensor (contiguous, on the CPU, built)."""
    return FUSED is not None and x.device.type == "cpu" and x.is_contiguous()


def _fused_geometry(x: Tensor, spec: ActivationSpec) -> tuple[int, int, int, int, float, float]:
    """(outer, units, inner, saturation mode, low, high): how the kernels read ``x``."""
    outer = units = inner = 1
    if spec.unit_axis is not None:
        axis = spec.unit_axis
        shape = x.shape
        outer, units, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    else:
        inner = x.numel()
    return (outer, units, inner, *_saturation_terms(spec))


def _saturation_terms(spec: ActivationSpec) -> tuple[int, float, float]:
    """(mode, low, high) of the saturated test: 0 none, 1 tanh (``|v| > high``), 2 sigmoid
    (``v < low or v > high``), 3 clipping (``v <= low or v >= high``)."""
    kind = spec.info.kind
    eps = spec.saturation_eps
    if kind is Kind.CLIPPING:
        assert spec.info.bounds is not None
        low, high = spec.info.bounds
    else:
        low, high = eps, 1.0 - eps
    return _SATURATION_MODES.get(kind, 0), low, high


def _fused_activation(
    fused: ModuleType,
    x: Tensor,
    spec: ActivationSpec,
    sums: Sequence[Tensor],
    maxes: Sequence[Tensor],
    counts: Sequence[Tensor],
) -> tuple[Tensor, Tensor | None]:
    """Every per-element statistic in one pass over a contiguous CPU tensor (actmon/_fused.c)."""
    hist = torch.empty(SYMLOG_BINS, dtype=torch.int64)
    outer, units, inner, mode, low, high = _fused_geometry(x, spec)
    unit_max = torch.empty(units, dtype=torch.float32) if spec.unit_axis is not None else None
    fused.activation(
        x.data_ptr(),
        outer,
        units,
        inner,
        mode,
        low,
        high,
        sums[0].data_ptr(),
        maxes[0].data_ptr(),
        counts[0].data_ptr(),
        hist.data_ptr(),
        unit_max.data_ptr() if unit_max is not None else 0,
        fused_threads(),
    )
    return hist, unit_max


def accumulate_activation(
    x: Tensor, spec: ActivationSpec, rows: Sequence[int] | triton_backend.ForwardRows
) -> int:
    """Add a fusable activation's statistics straight into one layer's window rows.

    ``rows`` are the addresses the aggregator gives (``Aggregator.forward_addresses``): sums
    (float64 [sum, sumsq]), maxima (float32 [max, -min]), counts (int64 [nonzero, saturated]),
    the raw histogram (int64 [2048]) and the step's per-unit maxima (float32, or 0 when the
    layer has no units). No per-call tensor is made and nothing is left to fold: on a CPU every
    small torch op costs 10-50 us once a training step has pushed its code out of the caches.
    Returns the call's count of non-finite elements. Softmax statistics are not taken here.

    On a device buffer ``rows`` is a ``triton_backend.ForwardRows`` of views instead: one
    launch adds the same statistics, the linear histogram and the call's non-finite count
    (into ``rows.call_counts``; nothing is read back, so 0 is returned).
    """
    if isinstance(rows, triton_backend.ForwardRows):
        _device_activation(x, spec, rows)
        return 0
    assert FUSED is not None
    outer, units, inner, mode, low, high = _fused_geometry(x, spec)
    return int(
        FUSED.activation_into(
            x.data_ptr(), outer, units, inner, mode, low, high, *rows, fused_threads()
        )
    )


def _device_activation(x: Tensor, spec: ActivationSpec, rows: triton_backend.ForwardRows) -> None:
    """``accumulate_activation`` on a device buffer: the spec turned into the kernel's terms."""
    linear = (0, 0.0, 0.0)
    if spec.linear_bins:
        assert spec.info.bounds is not None
        lin_low, lin_high = spec.info.bounds
        linear = (spec.linear_bins, lin_low, spec.linear_bins / (lin_high - lin_low))
    triton_backend.activation_into(x, rows, spec.unit_axis, _saturation_terms(spec), linear)


def accumulate_gradient(g: Tensor, rows: Sequence[int] | triton_backend.BackwardRows) -> None:
    """Add a fusable output gradient's statistics into one layer's window rows: sums (float64
    [sum of squares, non-finite, NaN]), maxima (float32 [max, -min]) and the raw histogram
    (int64 [2048], or 0 for none); see ``Aggregator.backward_addresses``. On a device buffer,
    one launch of the device backend does it (``rows`` is a ``triton_backend.BackwardRows``)."""
    if isinstance(rows, triton_backend.BackwardRows):
        triton_backend.gradient_into(g, rows)
        return
    assert FUSED is not None
    FUSED.gradient_into(g.data_ptr(), g.numel(), *rows, fused_threads())


def _torch_activation(
    x: Tensor,
    spec: ActivationSpec,
    sums: Sequence[Tensor],
    maxes: Sequence[Tensor],
    counts: Sequence[Tensor],
    scratch: Scratch,
) -> tuple[Tensor, Tensor | None]:
    """The same statistics as ``_fused_activation`` from torch ops (any device, no sync)."""
    flat = flat_view(x)
    _moments(flat, sums)
    unit_max = None
    if spec.unit_axis is not None:
        # A 1-D output: every element is a unit.
        unit_max = torch.amax(x, dim=spec.reduce_dims) if spec.reduce_dims else x.clone()
        torch.amax(unit_max, dim=0, out=maxes[0])
        torch.amin(flat, dim=0, out=maxes[1])
    else:
        torch.aminmax(flat, out=(maxes[1], maxes[0]))  # the dim=0 overload is ~40x slower
    temp = scratch.get(flat.numel(), torch.int32, flat.device)
    hist = bincount(symlog_index(flat, out=temp), SYMLOG_BINS)
    # Exact zero count: |bits| is 0 only for +-0 (subnormals stay non-zero, unlike the bin test).
    magnitude = torch.bitwise_and(flat.view(torch.int32), 0x7FFFFFFF, out=temp)
    torch.sum(magnitude.clamp_(max=1), dim=0, dtype=torch.int32, out=counts[0])
    if spec.info.kind in _SATURATION_MODES:
        _saturated(flat, spec, counts[1])
    return hist, unit_max


def _moments(flat: Tensor, sums: Sequence[Tensor]) -> None:
    """Sum and sum of squares into the float64 slots, from a stable mean and standard
    deviation (``std_mean``: Welford) rebuilt in float64 as ``n * mean`` and
    ``n * (std**2 + mean**2)``. Raw float32 sums cancel catastrophically (N(1e4, 1) read std 0);
    built from the same rounded mean, the window's ``sumsq / n - mean**2`` gives the variance
    back. (std, not var: a variance beyond ~3.4e38 would overflow float32.)"""
    n = flat.numel()
    std, mean = torch.std_mean(flat, dim=0, correction=0)
    mean64, std64 = mean.double(), std.double()
    torch.mul(mean64, n, out=sums[0])
    torch.addcmul(std64.square_().mul_(n), mean64, mean64, value=n, out=sums[1])


def _saturated(flat: Tensor, spec: ActivationSpec, out: Tensor) -> None:
    """Count of outputs in a saturated region (written into ``out``, int32)."""
    eps = spec.saturation_eps
    kind = spec.info.kind
    if kind is Kind.TANH:
        torch.sum(flat.abs() > 1.0 - eps, dim=0, dtype=torch.int32, out=out)
        return
    if kind is Kind.SIGMOID:
        low, high = flat < eps, flat > 1.0 - eps
    else:  # clipping: exactly at (or beyond) a clip bound
        assert spec.info.bounds is not None
        low, high = flat <= spec.info.bounds[0], flat >= spec.info.bounds[1]
    torch.sum(low.logical_or_(high), dim=0, dtype=torch.int32, out=out)


def _softmax_stats(x: Tensor, spec: ActivationSpec, sums: Sequence[Tensor]) -> None:
    """Sums over rows of the max probability and of the entropy (nats)."""
    dim = spec.softmax_dim
    assert dim is not None
    probs = x.exp() if spec.info.log_softmax else x
    torch.sum(torch.amax(probs, dim=dim), dim=tuple(range(x.dim() - 1)), out=sums[2])
    torch.sum(torch.special.entr(probs), dim=tuple(range(x.dim())), out=sums[3])


def _linear_hist(flat: Tensor, spec: ActivationSpec, scratch: Scratch) -> Tensor:
    """Equal-width bins over a bounded kind's range; NaN in the extra last bin.

    +-Inf land in the edge bins; the host removes them again using the exact symlog counts.
    """
    assert spec.info.bounds is not None
    low, high = spec.info.bounds
    nb = spec.linear_bins
    scaled = torch.sub(flat, low, out=scratch.get(flat.numel(), torch.float32, flat.device))
    scaled.mul_(nb / (high - low)).floor_().clamp_(0, nb - 1).nan_to_num_(nan=nb)
    index = scratch.get(flat.numel(), torch.int32, flat.device).copy_(scaled)
    return bincount(index, nb + 1)


@lru_cache(maxsize=8)
def _count_bins(device: torch.device) -> tuple[Tensor, Tensor]:
    """Index tensors of the non-finite and the NaN raw bins, made once per device."""
    return (
        torch.tensor(NONFINITE_BINS, dtype=torch.int64, device=device),
        torch.tensor(NAN_BINS, dtype=torch.int64, device=device),
    )


_SMALL = 1 << 12  # below this many elements, fewer dispatcher calls beat fewer passes


def summarize_gradient(
    g: Tensor, sums: Sequence[Tensor], maxes: Sequence[Tensor], with_hist: bool, scratch: Scratch
) -> Tensor | None:
    """Summarise a float32 output gradient into ``sums`` = [sum of squares, non-finite, NaN]
    and ``maxes`` = [max, min]; return its raw histogram when ``with_hist``.

    Without a histogram the non-finite counts of a large gradient come from float arithmetic,
    several times cheaper per element than binning or ``isfinite``: ``g * 0`` is 0 where g is
    finite and NaN where it is not; clamping first makes +-Inf finite so only NaN stays NaN.
    Small gradients use ``isfinite``/``isnan``, which take fewer calls.
    """
    if g.dtype is not torch.float32:  # a half-precision tensor the device backend would take
        g = g.float()
    flat = flat_view(g)
    n = flat.numel()
    if FUSED is not None and flat.device.type == "cpu" and flat.is_contiguous():
        hist = torch.empty(SYMLOG_BINS, dtype=torch.int64) if with_hist else None
        FUSED.gradient(
            flat.data_ptr(),
            n,
            sums[0].data_ptr(),
            maxes[0].data_ptr(),
            hist.data_ptr() if hist is not None else 0,
            fused_threads(),
        )
        return hist
    torch.dot(flat, flat, out=sums[0])
    torch.aminmax(flat, out=(maxes[1], maxes[0]))
    if with_hist:
        hist = bincount(
            symlog_index(flat, out=scratch.get(n, torch.int32, flat.device)), SYMLOG_BINS
        )
        nonfinite, nan = _count_bins(hist.device)
        torch.sum(hist.index_select(0, nonfinite), dim=0, dtype=torch.float32, out=sums[1])
        torch.sum(hist.index_select(0, nan), dim=0, dtype=torch.float32, out=sums[2])
        return hist
    if n < _SMALL:
        torch.sum(torch.isfinite(flat).logical_not_(), dim=0, dtype=torch.float32, out=sums[1])
        torch.sum(torch.isnan(flat), dim=0, dtype=torch.float32, out=sums[2])
        return None
    temp = scratch.get(n, torch.float32, flat.device)
    torch.sum(torch.mul(flat, 0.0, out=temp).nan_to_num_(nan=1.0), dim=0, out=sums[1])
    torch.clamp(flat, -1.0, 1.0, out=temp)
    torch.sum(temp.mul_(0.0).nan_to_num_(nan=1.0), dim=0, out=sums[2])
    return None
