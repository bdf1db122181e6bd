"""The Triton kernels of the GPU backend (imported by ``actmon.triton_backend`` at first use).

Each launch runs a few programs per streaming multiprocessor; a program loops over tiles of
the tensor, keeps its partial statistics in registers (block-local histograms included), and
merges them into the window rows with one atomic per statistic and per non-empty bin at its
end. Everything is read in the input's dtype and computed in float32 from its bit pattern, as
the torch-op kernels do: the histogram bin is ``(bits >> 21) + 1024`` of the float32 value,
the zero count tests ``bits & 0x7fffffff``, NaN and Inf are read from the exponent bits.
Extrema skip NaN and are set to NaN afterwards when a NaN was seen, because ``tl.max`` does
not propagate NaN on a GPU (and does in the interpreter): the result is the same on both.
"""

from __future__ import annotations

import triton
import triton.language as tl

_NAN_BITS = tl.constexpr(0x7FC00000)  # positive quiet NaN: above all floats as signed int
_EXP_BITS = tl.constexpr(0x7F800000)  # |bits| at or above: Inf or NaN; above: NaN
# Reductions through tl.reduce with the standard combine functions rather than tl.sum /
# tl.max: the same code on a GPU, and the interpreter recognises these and reduces with numpy
# even when triton was imported before TRITON_INTERPRET was set (torch.compile imports it),
# when its own jitted tl.sum cannot run inside an interpreted kernel.
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _ADD)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN)


# The raw histogram's 2048 bins are counted in a window of them: tl.histogram costs per element
# about bins / 32 popcounts (a ballot per index bit, then each lane counts its own bins), so all
# 2048 would make it several times dearer than reading the tensor. Each program instead counts
# WINDOW magnitude bins of each sign, placed from its first tile (up to HEADROOM bins above its
# largest finite magnitude, 14 octaves below), and the zero bins (zeros and the smallest
# subnormals) as two sums. The few elements outside (tiny, huge, Inf, NaN) are added to their
# bins in the window rows directly with atomics, so every bin is exact whatever the data.
WINDOW = tl.constexpr(64)
HEADROOM = tl.constexpr(8)
_INF_J = tl.constexpr(1020)  # magnitude bins at or above: Inf and NaN


@triton.jit
def _window_base(bits, mask):
    """The program's first windowed magnitude bin, from its first tile."""
    j = (bits & 0x7FFFFFFF) >> 21
    top = _max(tl.where(mask & (j > 0) & (j < _INF_J), j, 0), None)
    top = tl.where(top > 0, top, 508)  # no finite non-zero value: centred on 1.0
    return tl.maximum(top + HEADROOM - WINDOW + 1, 1)


@triton.jit
def _window_add(bits, mask, base, hist_ptr, window, zeros, N: tl.constexpr):
    """One tile into the program's window counts and zero counts ([+0 bin, -0 bin]); the
    elements outside the window straight into ``hist_ptr`` (int64 [2048]) with atomics."""
    j = (bits & 0x7FFFFFFF) >> 21
    negative = (bits < 0).to(tl.int32)
    relative = j - base
    inside = mask & (j > 0) & (j < _INF_J) & (relative >= 0) & (relative < WINDOW)
    key = tl.where(inside, relative * 2 + negative, 0)
    window += tl.histogram(tl.reshape(key, [N]), 2 * WINDOW, mask=tl.reshape(inside, [N]))
    zero = mask & (j == 0)
    zeros += tl.where(
        tl.arange(0, 2) == 0,
        _sum((zero & (negative == 0)).to(tl.int32), None),
        _sum((zero & (negative == 1)).to(tl.int32), None),
    )
    outside = mask & (j > 0) & ~inside
    one = tl.full(bits.shape, 1, tl.int64)
    tl.atomic_add(hist_ptr + ((bits >> 21) + 1024), one, mask=outside, sem="relaxed")
    return window, zeros


@triton.jit
def _window_flush(hist_ptr, window, zeros, base):
    """A program's window and zero counts into ``hist_ptr``, one atomic per non-empty bin."""
    k = tl.arange(0, 2 * WINDOW)
    j = base + (k >> 1)
    index = tl.where((k & 1) == 1, j, 1024 + j)  # negative values: bin j; positive: 1024 + j
    tl.atomic_add(hist_ptr + index, window.to(tl.int64), mask=window != 0, sem="relaxed")
    two = tl.arange(0, 2)
    zero_bins = tl.where(two == 0, 1024, 0)
    tl.atomic_add(hist_ptr + zero_bins, zeros.to(tl.int64), mask=zeros != 0, sem="relaxed")


@triton.jit
def _moments(x, mask, first, nans):
    """(sum, sum of squares) of a tile's elements in float64, as the fused C kernels take them:
    around the tile's first value (0 if it is not finite), in float32, and again in float64 when
    those float32 sums overflow with no NaN in the tile. Raw float32 sums cancel
    catastrophically (a constant 1e5 would read std 79, N(1e4, 1) std 0); around the first
    value they keep the spread, and the raw sums are rebuilt in float64."""
    shift = tl.where(first - first == 0.0, first, 0.0)
    d = tl.where(mask, x - shift, 0.0)
    s32 = _sum(d, None)
    q32 = _sum(d * d, None)
    s = s32.to(tl.float64)
    q = q32.to(tl.float64)
    if (nans == 0) & ((s32 - s32 != 0.0) | (q32 - q32 != 0.0)):  # overflowed: Inf - Inf is NaN
        d64 = tl.where(mask, x.to(tl.float64) - shift.to(tl.float64), 0.0)
        s = _sum(d64, None)
        q = _sum(d64 * d64, None)
    n = _sum(mask.to(tl.int32), None).to(tl.float64)
    c = shift.to(tl.float64)
    return s + n * c, q + 2.0 * c * s + n * c * c


@triton.jit
def _load(ptr, offsets, mask, HALF: tl.constexpr):
    """Elements as float32, from float32 (HALF 0), bfloat16 (1) or float16 (2), every finite
    value, zero and Inf exactly as torch converts it, so their bins match bit for bit.

    bfloat16 is float32's top half: widened by a shift (Triton's interpreter would flush its
    subnormals to zero). float16: finite values by the conversion (exact); Inf and NaN rebuilt
    from their bits, NaN with its payload shifted up and quieted (vcvtph2ps's rule), the same on
    a GPU and in the interpreter. Which NaN bin a float16 NaN lands in is not fixed even in
    torch (its CPU scalar path makes 0x7FFFFFFF, its vector path keeps the payload): NaN counts
    are exact, the NaN bins of half-precision inputs agree as a total.
    """
    if HALF == 0:
        x = tl.load(ptr + offsets, mask=mask, other=0.0)
    else:
        half = tl.load(
            ptr.to(tl.pointer_type(tl.int16), bitcast=True) + offsets, mask=mask, other=0
        )
        wide = half.to(tl.int32) & 0xFFFF
        if HALF == 1:
            x = (wide << 16).to(tl.float32, bitcast=True)
        else:
            value = half.to(tl.float16, bitcast=True).to(tl.float32)
            mantissa = wide & 0x3FF
            special = (wide & 0x7C00) == 0x7C00
            quiet = tl.where(mantissa != 0, 0x400000, 0)
            bits = ((wide & 0x8000) << 16) | _EXP_BITS | (mantissa << 13) | quiet
            x = tl.where(special, bits.to(tl.float32, bitcast=True), value)
    return x


@triton.jit
def _fmax_into(ptr, value, is_nan, mask):
    """``ptr[i] = max(ptr[i], value[i])`` on float32 with atomics, NaN winning over all.

    Non-negative floats order as their bits do as signed ints, negative ones in reverse as
    unsigned ints, and every non-negative float is below every negative one as unsigned: so a
    signed max for the former and an unsigned min for the latter (what triton does for float
    atomic_max, which drops NaN; here NaN is stored as the positive quiet NaN, which stays).
    """
    bits = tl.where(is_nan, _NAN_BITS, value.to(tl.int32, bitcast=True))
    signed = ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    unsigned = ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
    tl.atomic_max(signed, bits, mask=mask & (bits >= 0), sem="relaxed")
    tl.atomic_min(unsigned, bits.to(tl.uint32, bitcast=True), mask=mask & (bits < 0), sem="relaxed")


@triton.jit(do_not_specialize=["position"])
def activation(
    x_ptr,
    n,
    R,
    C,
    units,
    sum_ptr,
    max_ptr,
    count_ptr,
    hist_ptr,
    unit_ptr,
    lin_ptr,
    call_ptr,
    position,
    lo,
    hi,
    lin_low,
    lin_scale,
    UNITS: tl.constexpr,  # 0: no units; 1: units are the columns; 2: unit = row % units
    SAT: tl.constexpr,  # 0 none, 1 tanh, 2 sigmoid, 3 clipping
    LIN_BINS: tl.constexpr,  # 0: no linear histogram
    LIN_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HALF: tl.constexpr,  # the input dtype: 0 float32, 1 bfloat16, 2 float16
):
    """One activation read as a [R, C] row-major matrix (element r * C + c, below n)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_c = (C + BLOCK_C - 1) // BLOCK_C
    tiles = (R + BLOCK_R - 1) // BLOCK_R * tiles_c
    r_off = tl.arange(0, BLOCK_R)
    c_off = tl.arange(0, BLOCK_C)
    acc_s = tl.full([1], 0, tl.float64)
    acc_q = tl.full([1], 0, tl.float64)
    acc_mx = tl.full([1], float("-inf"), tl.float32)
    acc_mn = tl.full([1], float("inf"), tl.float32)
    acc_nan = tl.full([1], 0, tl.int32)
    acc_nz = tl.full([1], 0, tl.int32)
    acc_nf = tl.full([1], 0, tl.int32)
    acc_sat = tl.full([1], 0, tl.int32)
    window = tl.full([2 * WINDOW], 0, tl.int32)
    zeros = tl.full([2], 0, tl.int32)
    base = pid * 0
    lin = tl.full([LIN_BLOCK], 0, tl.int32)
    for t in range(pid, tiles, programs):
        tr = t // tiles_c
        rows = tr * BLOCK_R + r_off
        cols = (t - tr * tiles_c) * BLOCK_C + c_off
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        m = (rows[:, None] < R) & (cols[None, :] < C) & (offs < n)
        x = _load(x_ptr, offs, m, HALF)
        bits = x.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        nan = mag > _EXP_BITS
        real = m & (mag <= _EXP_BITS)
        tile_nan = _sum((m & nan).to(tl.int32), None)
        first = (r_off[:, None] == 0) & (c_off[None, :] == 0)  # the tile's first element
        tile_s, tile_q = _moments(x, m, _sum(tl.where(first, x, 0.0), None), tile_nan)
        acc_s += tile_s
        acc_q += tile_q
        acc_mx = tl.maximum(acc_mx, _max(tl.where(real, x, float("-inf")), None))
        acc_mn = tl.minimum(acc_mn, _min(tl.where(real, x, float("inf")), None))
        acc_nan += tile_nan
        acc_nz += _sum((m & (mag != 0)).to(tl.int32), None)
        acc_nf += _sum((m & (mag >= _EXP_BITS)).to(tl.int32), None)
        if SAT == 1:
            acc_sat += _sum((m & (tl.abs(x) > hi)).to(tl.int32), None)
        elif SAT == 2:
            acc_sat += _sum((m & ((x < lo) | (x > hi))).to(tl.int32), None)
        elif SAT == 3:
            acc_sat += _sum((m & ((x <= lo) | (x >= hi))).to(tl.int32), None)
        base = tl.where(t == pid, _window_base(bits, m), base)
        window, zeros = _window_add(bits, m, base, hist_ptr, window, zeros, BLOCK_R * BLOCK_C)
        if LIN_BINS > 0:
            scaled = tl.floor((x - lin_low) * lin_scale)
            scaled = tl.minimum(tl.maximum(scaled, 0.0), LIN_BINS - 1.0)
            lin_index = tl.where(nan, LIN_BINS * 1.0, scaled).to(tl.int32)  # NaN never cast
            flat_m = tl.reshape(m, [BLOCK_R * BLOCK_C])
            lin += tl.histogram(tl.reshape(lin_index, [BLOCK_R * BLOCK_C]), LIN_BLOCK, mask=flat_m)
        if UNITS == 1:  # units on the columns: each column's max over the tile's rows
            col_max = _max(tl.where(real, x, float("-inf")), 0)
            col_nan = _max((m & nan).to(tl.int32), 0) > 0
            _fmax_into(unit_ptr + cols, col_max, col_nan, cols < C)
        elif UNITS == 2:  # a row is one unit's inner extent (or part of it)
            row_max = _max(tl.where(real, x, float("-inf")), 1)
            row_nan = _max((m & nan).to(tl.int32), 1) > 0
            _fmax_into(unit_ptr + rows % units, row_max, row_nan, rows < R)
    one = tl.arange(0, 1)
    any_nan = acc_nan > 0
    tl.atomic_add(sum_ptr + one, acc_s, sem="relaxed")
    tl.atomic_add(sum_ptr + 1 + one, acc_q, sem="relaxed")
    _fmax_into(max_ptr + one, acc_mx, any_nan, one == 0)
    _fmax_into(max_ptr + 1 + one, -acc_mn, any_nan, one == 0)
    tl.atomic_add(count_ptr + one, acc_nz.to(tl.int64), sem="relaxed")
    if SAT != 0:
        tl.atomic_add(count_ptr + 1 + one, acc_sat.to(tl.int64), sem="relaxed")
    tl.atomic_add(call_ptr + position + one, acc_nf.to(tl.int64), sem="relaxed")
    _window_flush(hist_ptr, window, zeros, base)
    if LIN_BINS > 0:
        lin_bins = tl.arange(0, LIN_BLOCK)
        keep = (lin != 0) & (lin_bins <= LIN_BINS)
        tl.atomic_add(lin_ptr + lin_bins, lin.to(tl.int64), mask=keep, sem="relaxed")


@triton.jit
def gradient(
    g_ptr,
    n,
    sum_ptr,
    max_ptr,
    hist_ptr,
    HIST: tl.constexpr,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
):
    """One output gradient, flat: sum of squares, NaN/Inf counts, extrema, histogram."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offsets = tl.arange(0, BLOCK).to(tl.int64)
    acc_q = tl.full([1], 0, tl.float64)
    acc_mx = tl.full([1], float("-inf"), tl.float32)
    acc_mn = tl.full([1], float("inf"), tl.float32)
    acc_nf = tl.full([1], 0, tl.int32)
    acc_nan = tl.full([1], 0, tl.int32)
    window = tl.full([2 * WINDOW], 0, tl.int32)
    zeros = tl.full([2], 0, tl.int32)
    base = pid * 0
    for t in range(pid, (n + BLOCK - 1) // BLOCK, programs):
        offs = offsets + t * BLOCK  # t * BLOCK < n: no int32 overflow
        m = offs < n
        x = _load(g_ptr, offs, m, HALF)
        bits = x.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        real = m & (mag <= _EXP_BITS)
        acc_q += _sum(x * x, 0).to(tl.float64)
        acc_mx = tl.maximum(acc_mx, _max(tl.where(real, x, float("-inf")), None))
        acc_mn = tl.minimum(acc_mn, _min(tl.where(real, x, float("inf")), None))
        acc_nf += _sum((m & (mag >= _EXP_BITS)).to(tl.int32), None)
        acc_nan += _sum((m & (mag > _EXP_BITS)).to(tl.int32), None)
        if HIST:
            base = tl.where(t == pid, _window_base(bits, m), base)
            window, zeros = _window_add(bits, m, base, hist_ptr, window, zeros, BLOCK)
    one = tl.arange(0, 1)
    any_nan = acc_nan > 0
    tl.atomic_add(sum_ptr + one, acc_q, sem="relaxed")
    tl.atomic_add(sum_ptr + 1 + one, acc_nf.to(tl.float64), sem="relaxed")
    tl.atomic_add(sum_ptr + 2 + one, acc_nan.to(tl.float64), sem="relaxed")
    _fmax_into(max_ptr + one, acc_mx, any_nan, one == 0)
    _fmax_into(max_ptr + 1 + one, -acc_mn, any_nan, one == 0)
    if HIST:
        _window_flush(hist_ptr, window, zeros, base)
