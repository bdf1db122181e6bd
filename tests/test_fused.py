"""The fused one-pass CPU kernels (actmon/_fused.c) against the torch-op kernels, exactly."""

from __future__ import annotations

import os

import pytest
import torch

from actmon import stats
from actmon.kinds import Kind, KindInfo
from tests.test_stats import _run_activation, _special

if stats.FUSED is None:
    # CI builds the extension (make test installs with a C compiler): missing there is a bug.
    assert os.environ.get("CI") != "true", "actmon._fused was not built"
    pytest.skip("actmon._fused is not built here", allow_module_level=True)

FUSED = stats.FUSED
KINDS = [
    KindInfo(Kind.RELU),
    KindInfo(Kind.LINEAR),
    KindInfo(Kind.TANH, bounds=(-1.0, 1.0)),
    KindInfo(Kind.SIGMOID, bounds=(0.0, 1.0)),
    KindInfo(Kind.CLIPPING, bounds=(0.0, 6.0)),
]
# (shape, unit axis): units last, units on axis 1 with an inner extent (maps smaller than a
# 4096-element block read in groups of units, a last group short), flat, 1-D, and sizes above
# the threading threshold (2**15 elements) with a tail that does not divide evenly.
LAYOUTS = [
    ((64, 32), -1),
    ((4, 6, 5, 7), 1),
    ((5, 300, 4, 4), 1),
    ((9, 1000, 3, 3), 1),
    ((8, 16, 24), None),
    ((37,), 0),
    ((3, 7, 111, 131), 1),
    ((262_147,), None),
    ((1031, 257), -1),
]


VARIANTS = [(isa, threads) for isa in FUSED.variants() for threads in (1, 2)]


@pytest.fixture(params=VARIANTS, ids=[f"{isa}-{t}-thread" for isa, t in VARIANTS], autouse=True)
def _variant(request):
    """Every comparison with each instruction-set variant this CPU runs (AVX-512, AVX2, the
    base one), on one thread and split over two."""
    isa, threads = request.param
    best, default_threads = FUSED.isa(), stats.FUSED_THREADS
    FUSED.set_isa(isa)
    stats.FUSED_THREADS = threads
    yield
    FUSED.set_isa(best)
    stats.FUSED_THREADS = default_threads


def _both(monkeypatch, x, info, axis):
    fused = _run_activation(x, info, axis)
    monkeypatch.setattr(stats, "FUSED", None)
    plain = _run_activation(x, info, axis)
    monkeypatch.setattr(stats, "FUSED", FUSED)
    return fused, plain


@pytest.mark.parametrize("info", KINDS, ids=[k.kind.value for k in KINDS])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=[str(s) for s, _ in LAYOUTS])
def test_fused_activation_equals_the_torch_op_kernels(monkeypatch, info, shape, axis):
    x = _special(shape, torch.float32)
    if info.kind is Kind.SIGMOID:
        x = torch.sigmoid(x)  # values near both bounds
    fused, plain = _both(monkeypatch, x, info, axis)
    _, f_max, f_counts, f_hist, f_units, _ = fused
    _, p_max, p_counts, p_hist, p_units, _ = plain
    assert torch.equal(f_hist, p_hist)  # exact, NaN/Inf bins included
    assert f_counts[0] == p_counts[0]  # exact zero count (subnormals are not zeros)
    if info.kind in (Kind.TANH, Kind.SIGMOID, Kind.CLIPPING):
        assert f_counts[1] == p_counts[1]
    assert torch.allclose(f_max, p_max, equal_nan=True, rtol=0, atol=0)  # max and min
    if axis is not None:
        assert f_units is not None
        assert torch.allclose(f_units, p_units, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shape", "axis", "nan_at"),
    [((3, 300, 4, 4), 1, [(1, 290), (2, 7)]), ((300, 40), -1, [(250, 9), (1, 7)])],
    ids=["4x4 maps, 256 units a group", "units last, 102 rows a group"],
)
def test_unit_maxima_in_later_groups_keep_nan_and_inf(monkeypatch, shape, axis, nan_at):
    """The kernels read units in groups of about a block, take maxima that skip NaN, and put
    a unit whose group saw a NaN to NaN after. NaN (in a later group of units or of rows),
    +Inf, -Inf and never-positive units get their own maxima, and a NaN stays once seen."""
    x = torch.randn(shape)
    units = x.movedim(axis, -1)  # a view, units last: writes land in x
    for row, unit in nan_at:
        units[row, ..., unit] = float("nan")
    units[..., 21] = float("-inf")  # a whole unit at -inf: its max is -inf
    units[..., 13] = -torch.rand(units[..., 13].shape) - 1  # never positive
    units[0, ..., 17] = float("inf")
    fused, plain = _both(monkeypatch, x, KindInfo(Kind.RELU), axis)
    f_units, p_units = fused[4], plain[4]
    assert torch.allclose(f_units, p_units, equal_nan=True, rtol=0, atol=0)
    want = units.reshape(-1, units.shape[-1]).amax(dim=0)  # plain torch: NaN propagates
    assert torch.allclose(f_units, want, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(f_units).nonzero().flatten().tolist() == sorted(u for _, u in nan_at)
    assert f_units[17] == float("inf")
    assert f_units[21] == float("-inf")
    assert f_units[13] < 0


def test_fused_sums_are_at_least_as_accurate_as_float32_torch(monkeypatch):
    x = torch.randn(1031, 257) * 100 + 3
    (f_sums, *_), (p_sums, *_) = _both(monkeypatch, x, KindInfo(Kind.LINEAR), None)
    exact = (x.double().sum().item(), x.double().pow(2).sum().item())
    for got, want in zip(f_sums[:2].tolist(), exact, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert f_sums[:2].tolist() == pytest.approx(p_sums[:2].tolist(), rel=1e-5)


@pytest.mark.parametrize("with_hist", [False, True])
@pytest.mark.parametrize("n", [5, 1024, 300_001])
def test_fused_gradient_equals_the_torch_op_kernels(monkeypatch, with_hist, n):
    g = torch.randn(n) * 1e3
    g[1] = float("nan")
    if n > 3:
        g[3] = float("-inf")
        g[-1] = float("inf")

    def run():
        sums, maxes = torch.zeros(3), torch.zeros(2)
        hist = stats.summarize_gradient(
            g, sums.unbind(0), maxes.unbind(0), with_hist, stats.Scratch()
        )
        return sums, maxes, hist

    f_sums, f_max, f_hist = run()
    monkeypatch.setattr(stats, "FUSED", None)
    p_sums, p_max, p_hist = run()
    assert f_sums[1:].tolist() == p_sums[1:].tolist()  # non-finite and NaN counts
    assert torch.allclose(f_max, p_max, equal_nan=True, rtol=0, atol=0)
    assert torch.allclose(f_sums[:1], p_sums[:1], equal_nan=True)
    if with_hist:
        assert torch.equal(f_hist, p_hist)
    else:
        assert f_hist is None


def test_non_contiguous_inputs_use_the_torch_op_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(stats, "_fused_activation", lambda *a: calls.append(a) or (None, None))
    x = torch.randn(8, 16).t()  # not contiguous: the torch-op path
    _run_activation(x, KindInfo(Kind.RELU), 0)
    assert not calls


def test_fused_norms_equal_foreach_norm_with_nan_and_inf(monkeypatch):
    tensors = [torch.randn(n) * 10 for n in (1, 7, 4096, 4097, 100_000)]
    tensors.append(torch.tensor([1.0, float("inf")]))
    tensors.append(torch.tensor([float("nan"), 2.0]))
    tensors.append(torch.randn(3, 5))
    got = stats.norms(tensors)
    want = torch.stack([t.double().norm() for t in tensors]).float()
    assert torch.allclose(got, want, rtol=1e-6, equal_nan=True)
    monkeypatch.setattr(stats, "FUSED", None)
    assert torch.allclose(stats.norms(tensors), got, rtol=1e-5, equal_nan=True)


def test_an_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="'sse9' is not available"):
        FUSED.set_isa("sse9")


def test_split_passes_run_on_torchs_own_openmp_workers(monkeypatch):
    """Built with OpenMP, the kernels use the runtime torch loaded (no second thread pool
    competing with torch's), and follow torch's thread count."""
    if FUSED.openmp() is None:
        assert os.environ.get("CI") != "true", "actmon._fused was built without OpenMP"
        pytest.skip("built without OpenMP")
    assert stats._SHARED_OPENMP
    # scikit-learn's Linux wheels map a libgomp of their own: the kernels still use torch's.
    import sklearn.utils._openmp_helpers  # noqa: F401

    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) >= 2 or os.environ.get("CI") != "true"
    assert stats._shares_torch_openmp(FUSED)
    monkeypatch.setattr(stats, "FUSED_THREADS", None)  # no ACTMON_FUSED_THREADS: the default
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert stats.fused_threads() == 1
        torch.set_num_threads(2)
        assert stats.fused_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fused_norms_of_large_tensors_split_over_chunks_and_threads():
    """Above 8 chunks of 2**16 elements the norms are shared between threads; the chunks are
    fixed, so the sums are the same on one thread or two."""
    tensors = [torch.randn(n) for n in (300_001, 1 << 19, 3, 70_000)]
    tensors[1][12345] = float("inf")
    got = stats.norms(tensors)
    want = torch.stack([t.double().norm() for t in tensors]).float()
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.isinf(got[1])
    stats.FUSED_THREADS = 1
    assert torch.equal(stats.norms(tensors), got)
