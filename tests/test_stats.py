"""Stats kernels against independent plain-torch / numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actmon import histogram, stats
from actmon.kinds import Kind, KindInfo
from tests.conftest import reference_raw_hist, reference_stats


def _run_activation(
    x: torch.Tensor,
    info: KindInfo,
    unit_axis: int | None,
    linear_bins: int = 0,
    softmax_dim: int | None = None,
):
    xf = stats.as_float32(x, "x")
    assert xf is not None
    ndim = xf.dim()
    axis = unit_axis % ndim if unit_axis is not None else None
    spec = stats.ActivationSpec(
        info=info,
        unit_axis=axis,
        reduce_dims=tuple(d for d in range(ndim) if d != axis) if axis is not None else (),
        saturation_eps=0.01,
        linear_bins=linear_bins,
        softmax_dim=softmax_dim,
    )
    sums = torch.zeros(4, dtype=torch.float64)  # the slots hold float64 moments
    maxes = torch.zeros(2)
    counts = torch.zeros(2, dtype=torch.int32)
    with torch.no_grad():
        hist, unit_max, lin = stats.summarize_activation(
            xf, spec, sums.unbind(0), maxes.unbind(0), counts.unbind(0), stats.Scratch()
        )
    return sums, maxes, counts, hist, unit_max, lin


def _special(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape) * 3
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[1::11] = -0.0
    flat[2] = float("nan")
    flat[3] = float("inf")
    flat[5] = float("-inf")
    flat[6] = float("nan")
    if dtype == torch.float32:
        flat[8] = 1e-42  # subnormal: not a zero, lands in the lowest magnitude bin
    return x.to(dtype)


SHAPES = [((64, 32), -1), ((8, 16, 24), -1), ((4, 6, 5, 7), 1)]


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_activation_counts_and_moments_match_reference(shape, axis, dtype):
    x = _special(shape, dtype)
    _, _, counts, hist, _, _ = _run_activation(x, KindInfo(Kind.RELU), axis)
    ref = reference_stats([x], unit_axis=axis)
    raw = hist.numpy()
    assert int(raw[list(stats.NAN_BINS)].sum()) == ref["nan"] == 2
    assert int(raw[stats.POS_INF_BIN]) == ref["posinf"] == 1
    assert int(raw[stats.NEG_INF_BIN]) == ref["neginf"] == 1
    assert int(raw.sum()) == ref["count"]
    assert x.numel() - int(counts[0]) == ref["zeros"]
    # NaN payloads and signs vary with the dtype conversion: NaN bins are compared as a total.
    finite_bins = np.ones(2048, dtype=bool)
    finite_bins[list(stats.NAN_BINS)] = False
    np.testing.assert_array_equal(raw[finite_bins], reference_raw_hist([x])[finite_bins])
    # Moments and extrema on the finite part (the special values make the totals non-finite).
    finite = torch.where(torch.isfinite(x.float()), x.float(), torch.zeros(()))
    s2, m2, _, _, um2, _ = _run_activation(finite, KindInfo(Kind.RELU), axis)
    ref2 = reference_stats([finite], unit_axis=axis)
    assert float(s2[0]) == pytest.approx(ref2["sum"], rel=1e-5, abs=1e-3)
    assert float(s2[1]) == pytest.approx(
        ref2["std"] ** 2 * ref2["count"] + ref2["sum"] ** 2 / ref2["count"], rel=1e-5
    )
    assert float(m2[0]) == ref2["max"]
    assert float(m2[1]) == ref2["min"]
    assert um2 is not None
    assert int((um2 <= 0).sum()) == ref2["dead_units"]
    assert um2.numel() == ref2["units"]


def test_unit_max_matches_amax_on_unit_axis():
    x = torch.randn(5, 7, 3, 4)
    x[:, 2] = -1.0  # channel 2 never active
    _, _, _, _, unit_max, _ = _run_activation(x, KindInfo(Kind.RELU), 1)
    torch.testing.assert_close(unit_max, x.amax(dim=(0, 2, 3)))


@pytest.mark.parametrize("kind", [Kind.SIGMOID, Kind.TANH, Kind.CLIPPING])
def test_saturation_counts(kind):
    bounds = {Kind.SIGMOID: (0.0, 1.0), Kind.TANH: (-1.0, 1.0), Kind.CLIPPING: (0.0, 6.0)}[kind]
    pre = torch.randn(200, 30) * 4
    y = {
        Kind.SIGMOID: torch.sigmoid,
        Kind.TANH: torch.tanh,
        Kind.CLIPPING: lambda t: torch.clamp(t, 0, 6),
    }[kind](pre)
    _, _, counts, _, _, lin = _run_activation(
        y, KindInfo(kind, bounds=bounds), None, linear_bins=16
    )
    if kind is Kind.SIGMOID:
        expected = int(((y < 0.01) | (y > 0.99)).sum())
    elif kind is Kind.TANH:
        expected = int((y.abs() > 0.99).sum())
    else:
        expected = int(((y <= 0) | (y >= 6)).sum())
    assert int(counts[1]) == expected
    assert lin is not None
    ref_lin, _ = np.histogram(y.numpy(), bins=16, range=bounds)
    # np.histogram closes the last bin on the right, like our clamp of the upper bound.
    np.testing.assert_array_equal(lin[:-1].numpy(), ref_lin)
    assert int(lin[-1]) == 0


@pytest.mark.parametrize("log", [False, True])
def test_softmax_max_prob_and_entropy(log):
    logits = torch.randn(6, 5, 11) * 3
    probs = torch.softmax(logits, dim=-1)
    x = torch.log_softmax(logits, dim=-1) if log else probs
    info = KindInfo(
        Kind.SOFTMAX, bounds=None if log else (0.0, 1.0), softmax_dim=-1, log_softmax=log
    )
    sums, *_ = _run_activation(x, info, None, linear_bins=0, softmax_dim=2)
    rows = 6 * 5
    expected_max = probs.amax(-1).sum().item()
    expected_entropy = -(probs * probs.log()).sum().item()
    assert float(sums[2]) / rows == pytest.approx(expected_max / rows, rel=1e-5)
    assert float(sums[3]) / rows == pytest.approx(expected_entropy / rows, rel=1e-5)


@pytest.mark.parametrize("numel", [1000, (1 << 18) + 3])  # both non-finite counting paths
@pytest.mark.parametrize("with_hist", [False, True])
def test_gradient_kernel(numel, with_hist):
    g = torch.randn(numel)
    g[10:13] = float("nan")
    g[20] = float("inf")
    g[21:23] = float("-inf")
    sums, maxes = torch.zeros(3), torch.zeros(2)
    hist = stats.summarize_gradient(g, sums.unbind(0), maxes.unbind(0), with_hist, stats.Scratch())
    assert int(sums[1]) == 6
    assert int(sums[2]) == 3
    finite = g.clone()
    finite[~torch.isfinite(finite)] = 0.0
    fs, fm = torch.zeros(3), torch.zeros(2)
    stats.summarize_gradient(finite, fs.unbind(0), fm.unbind(0), with_hist, stats.Scratch())
    assert float(fs[0]) == pytest.approx(float((finite.double() ** 2).sum()), rel=1e-5)
    assert max(float(fm[0]), -float(fm[1])) == float(finite.abs().max())
    assert int(fs[1]) == 0
    if with_hist:
        assert hist is not None
        assert int(hist.sum()) == numel
    else:
        assert hist is None


def test_scatter_bincount_equals_bincount():
    index = torch.randint(0, 2048, (10_000,), dtype=torch.int32)
    torch.testing.assert_close(stats.scatter_bincount(index, 2048), stats.bincount(index, 2048))


def test_flat_view_does_not_copy_channels_last():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    flat = stats.flat_view(x)
    assert flat.data_ptr() == x.data_ptr()
    assert flat.numel() == x.numel()


def test_unsupported_tensors_raise_hook_error():
    from actmon.errors import HookError

    with pytest.raises(HookError, match=r"dtype torch.int64; supported dtypes are float32"):
        stats.as_float32(torch.arange(3), "layer 'x' output")
    with pytest.raises(HookError, match=r"layout torch\.sparse_coo"):
        stats.as_float32(torch.eye(3).to_sparse(), "layer 'x' output")
    with pytest.raises(HookError, match=r"dtype torch\.complex64"):
        stats.as_float32(torch.zeros(2, dtype=torch.complex64), "layer 'x' output")
    assert stats.as_float32(torch.zeros(0, 3), "x") is None


def test_histograms_merge_exactly():
    a, b = torch.randn(300) * 10, torch.randn(500) * 0.01
    ha = _run_activation(a, KindInfo(Kind.LINEAR), None)[3]
    hb = _run_activation(b, KindInfo(Kind.LINEAR), None)[3]
    hab = _run_activation(torch.cat([a, b]), KindInfo(Kind.LINEAR), None)[3]
    torch.testing.assert_close(ha + hb, hab)


def test_symlog_view_bins_hold_their_values():
    values = np.concatenate([np.random.default_rng(0).normal(0, s, 2000) for s in (1e-3, 1, 1e3)])
    raw = reference_raw_hist([torch.tensor(values, dtype=torch.float32)])
    edges, counts = histogram.symlog_view(raw, -12, 12, 2)
    assert counts.sum() == len(values)
    v32 = values.astype(np.float32).astype(np.float64)
    clipped = np.clip(v32, edges[0], np.nextafter(edges[-1], 0))
    expected = np.zeros(len(edges) - 1)
    for v in clipped:
        # Positive bins are [lo, hi); negative ones (lo, hi]: search on |v| mirrors that.
        b = (
            np.searchsorted(edges, v, side="right") - 1
            if v >= 0
            else (np.searchsorted(edges, v, side="left") - 1)
        )
        expected[b] += 1
    np.testing.assert_array_equal(counts, expected)


def test_quantiles_within_one_bin():
    x = torch.randn(20_000) * 5
    raw = reference_raw_hist([x])
    qs = histogram.quantiles(
        histogram.full_edges(),
        histogram.full_counts(raw),
        [0.05, 0.5, 0.95],
        float(x.min()),
        float(x.max()),
    )
    for q, value in qs.items():
        true = float(torch.quantile(x.double(), q))
        assert math.isclose(value, true, rel_tol=0.25, abs_tol=1e-6), (q, value, true)


def _raw_bin(value: float) -> int:
    """The raw bit-pattern bin of a float32 value (sign, exponent, 2 mantissa bits)."""
    return int(np.array([value], np.float32).view(np.int32)[0]) >> 21


def test_relu_quantiles_in_the_zero_bin_read_zero_and_the_rest_within_one_bin():
    """ReLU outputs: quantiles at the zeros read 0.0 exactly (not a denormal such as 2.5e-39),
    the others fall in the same bin as torch.quantile's."""
    from torch import nn

    import actmon

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
    monitor = actmon.watch(model, log_every=1, sample_every=1, sinks={"store": {"enabled": False}})
    x = torch.randn(256, 16)
    out = model(x)
    out.sum().backward()
    snap = monitor.step()
    monitor.close()
    relu = out.detach().flatten().double()
    assert 0.25 < float((relu == 0).double().mean()) < 0.75  # zeros hold the lower quantiles
    got = snap.layers["1"].quantiles
    for q, value in got.items():
        true = float(torch.quantile(relu, q))
        if true == 0.0:
            assert value == 0.0, (q, value)
        else:
            assert _raw_bin(value) == _raw_bin(true), (q, value, true)
    assert got[0.25] == 0.0
    assert got[0.99] > 0
