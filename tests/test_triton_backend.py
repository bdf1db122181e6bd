"""The Triton GPU backend (actmon/triton_backend.py) against the torch-op kernels, exactly.

CI has no GPU: Triton's interpreter runs the same kernels on CPU tensors (TRITON_INTERPRET=1,
with ACTMON_TRITON's ``force`` mode). Counts, histograms, extrema and per-unit maxima must equal
the torch-op kernels bit for bit over shapes, layouts, dtypes and special values; sums agree to
rounding. A compile test builds the kernels for a Hopper GPU (sm_90) with Triton's own
compiler, which checks what the interpreter does not (types, loop-carried values).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import actmon
from actmon import stats, triton_backend
from actmon.kinds import Kind, KindInfo
from tests.test_direct import assert_same_snapshots, mixed_model


@pytest.fixture(autouse=True)
def _interpreted(monkeypatch):
    """Every test here runs the kernels in Triton's interpreter on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "MODE", "force")


def _torch_ops(monkeypatch):
    """The torch-op kernels only: no device backend, no fused C kernels."""
    monkeypatch.setattr(triton_backend, "MODE", "0")
    monkeypatch.setattr(stats, "FUSED", None)


KINDS = [
    KindInfo(Kind.RELU),
    KindInfo(Kind.LINEAR),
    KindInfo(Kind.TANH, bounds=(-1.0, 1.0)),
    KindInfo(Kind.SIGMOID, bounds=(0.0, 1.0)),
    KindInfo(Kind.CLIPPING, bounds=(0.0, 6.0)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# (make a tensor of this shape, unit axis): units last (wider than a 1024-column tile too),
# units on axis 1 with an inner extent (smaller than a tile; larger: one unit over two column
# tiles), flat, 1-D, channels-last and transposed (dense, not contiguous: read in memory order).
LAYOUTS = [
    ((64, 32), -1, None),
    ((3, 1100), -1, None),
    ((4, 6, 5, 7), 1, None),
    ((5, 300, 2, 2), 1, None),
    ((2, 3, 40, 40), 1, None),
    ((8, 16, 24), None, None),
    ((37,), 0, None),
    ((3, 8, 5, 5), 1, "channels_last"),
    ((12, 16), -1, "transposed"),
]


def _special(shape: tuple[int, ...], dtype: torch.dtype, layout: str | None) -> torch.Tensor:
    """Normal values with +-0, NaN of both signs, +-Inf, the dtype's largest finite values and
    a subnormal of the dtype, in the given memory layout."""
    x = torch.randn(shape) * 3
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[1::11] = -0.0
    flat[2] = float("nan")
    flat[3] = float("inf")
    flat[5] = float("-inf")
    flat[6] = -torch.tensor(float("nan"))  # sign bit set: another NaN bin
    finfo = torch.finfo(dtype)
    flat[9] = finfo.max
    flat[10] = -finfo.max
    flat[12] = finfo.tiny / 4  # subnormal in its dtype: not a zero
    flat[13] = -finfo.tiny / 8
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.t().contiguous().t()  # the same values, column-major
    return x


def _spec(x: torch.Tensor, info: KindInfo, axis: int | None, bins: int) -> stats.ActivationSpec:
    ndim = x.dim()
    unit_axis = axis % ndim if axis is not None else None
    return stats.ActivationSpec(
        info=info,
        unit_axis=unit_axis,
        reduce_dims=tuple(d for d in range(ndim) if d != unit_axis) if axis is not None else (),
        saturation_eps=0.01,
        linear_bins=bins if info.bounds is not None else 0,
        softmax_dim=None,
    )


def _device_activation(x: torch.Tensor, spec: stats.ActivationSpec) -> dict[str, torch.Tensor]:
    """One launch into fresh rows, with rows already holding an earlier call (max must fold)."""
    units = x.shape[spec.unit_axis] if spec.unit_axis is not None else 0
    rows = triton_backend.ForwardRows(
        sums=torch.zeros(4, dtype=torch.float64),
        maxes=torch.full((2,), float("-inf")),
        counts=torch.zeros(2, dtype=torch.int64),
        hist=torch.zeros(2048, dtype=torch.int64),
        units=torch.full((units,), float("-inf")) if units else None,
        linear=torch.zeros(spec.linear_bins + 1, dtype=torch.int64),
        call_counts=torch.zeros(5, dtype=torch.int64),
        position=3,
    )
    assert stats.fusable(x)
    before = triton_backend.LAUNCHES["activation"]
    assert stats.accumulate_activation(x, spec, rows) == 0
    assert triton_backend.LAUNCHES["activation"] == before + 1
    return rows._asdict()


def _torch_activation(x: torch.Tensor, spec: stats.ActivationSpec) -> dict[str, torch.Tensor]:
    sums, maxes = torch.zeros(4), torch.zeros(2)
    counts = torch.zeros(2, dtype=torch.int32)
    with torch.no_grad():
        hist, unit_max, linear = stats.summarize_activation(
            stats.as_float32(x, "x"),  # type: ignore[arg-type]
            spec,
            sums.unbind(0),
            maxes.unbind(0),
            counts.unbind(0),
            stats.Scratch(),
        )
    return {
        "sums": sums,
        "maxes": torch.stack([maxes[0], -maxes[1]]),
        "counts": counts.long(),
        "hist": hist,
        "units": unit_max,
        "linear": linear,
    }


_NAN_BINS = list(stats.NAN_BINS)


def _same_hist(got: torch.Tensor | None, want: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Every bin equal; for a half-precision input the NaN bins as a total (which NaN bit
    pattern a float16 NaN widens to differs between torch's own CPU code paths)."""
    if got is None or want is None:
        return got is None and want is None
    if dtype is torch.float32:
        return torch.equal(got, want)
    finite = torch.ones(2048, dtype=torch.bool)
    finite[_NAN_BINS] = False
    same_nan = int(got[_NAN_BINS].sum()) == int(want[_NAN_BINS].sum())
    return same_nan and torch.equal(got[finite], want[finite])


def _exact(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(
        a.double(), b.double(), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", KINDS, ids=[k.kind.value for k in KINDS])
@pytest.mark.parametrize(("shape", "axis", "layout"), LAYOUTS, ids=lambda v: str(v))
def test_activation_launch_equals_the_torch_op_kernels(
    monkeypatch, shape, axis, layout, info, dtype
):
    x = _special(shape, dtype, layout)
    if info.kind is Kind.SIGMOID:
        x = torch.sigmoid(x.float()).to(dtype)  # values near both bounds, and exactly at them
    spec = _spec(x, info, axis, bins=16)
    got = _device_activation(x, spec)
    _torch_ops(monkeypatch)
    want = _torch_activation(x, spec)
    assert _same_hist(got["hist"], want["hist"], dtype)  # Inf, zero, subnormal, huge: exact
    assert torch.equal(got["counts"][0], want["counts"][0])  # exact non-zero count
    if info.kind in (Kind.TANH, Kind.SIGMOID, Kind.CLIPPING):
        assert torch.equal(got["counts"][1], want["counts"][1])
        assert torch.equal(got["linear"], want["linear"])
    assert _exact(got["maxes"], want["maxes"])  # max and -min: NaN here
    assert _exact(got["units"], want["units"])
    nonfinite = int(want["hist"][list(stats.NONFINITE_BINS)].sum())
    assert got["call_counts"].tolist() == [0, 0, 0, nonfinite, 0]  # at the call's position
    assert torch.isnan(got["sums"][:2]).all()  # NaN and Inf make the sums NaN, as torch's


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "axis", "layout"), LAYOUTS[:5], ids=lambda v: str(v))
def test_finite_sums_and_extrema_agree(monkeypatch, shape, axis, layout, dtype):
    x = (torch.randn(shape) * 100 + 3).to(dtype)
    spec = _spec(x, KindInfo(Kind.LINEAR), axis, bins=0)
    got = _device_activation(x, spec)
    exact = x.double()
    scale = exact.abs().sum().item()  # float32 partial sums: error relative to sum |x|
    assert got["sums"][0].item() == pytest.approx(exact.sum().item(), abs=1e-6 * scale)
    assert got["sums"][1].item() == pytest.approx(exact.square().sum().item(), rel=1e-6)
    _torch_ops(monkeypatch)
    want = _torch_activation(x, spec)
    assert _exact(got["maxes"], want["maxes"])
    assert got["maxes"][0].item() == exact.max().item()
    assert _exact(got["units"], want["units"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_histogram_is_exact_whatever_the_spread(monkeypatch, dtype):
    """Each program counts a window of bins placed from its first tile and adds the rest with
    atomics: magnitudes spread over the whole float range, a first tile far smaller or far
    larger than the later ones, and zeros only, still give every bin exactly."""
    gen = torch.Generator().manual_seed(4)
    finfo = torch.finfo(dtype)
    low, high = math.log2(finfo.tiny) - 8, math.log2(finfo.max) - 1
    spread = torch.exp2(torch.rand(20_000, generator=gen) * (high - low) + low)
    spread *= torch.randint(0, 2, (20_000,), generator=gen) * 2 - 1
    tiny_first = torch.randn(20_000, generator=gen)
    tiny_first[:4096] *= 1e-30 if dtype is not torch.float16 else 1e-4
    huge_first = torch.randn(20_000, generator=gen)
    huge_first[:4096] *= 1e30 if dtype is not torch.float16 else 1e4
    for x in (spread, tiny_first, huge_first, torch.zeros(9000), -torch.zeros(9000)):
        x = x.to(dtype)
        for axis in (None, -1):
            shaped = x.view(-1, 40) if axis is not None else x
            spec = _spec(shaped, KindInfo(Kind.LINEAR), axis, bins=0)
            got = _device_activation(shaped, spec)
            rows = triton_backend.BackwardRows(
                torch.zeros(3, dtype=torch.float64),
                torch.full((2,), float("-inf")),
                torch.zeros(2048, dtype=torch.int64),
            )
            stats.accumulate_gradient(shaped, rows)
            want = torch.bincount(
                (shaped.float().reshape(-1).view(torch.int32) >> 21) + 1024, minlength=2048
            )
            assert torch.equal(got["hist"], want)
            assert torch.equal(rows.hist, want)


def test_unit_maxima_keep_nan_and_inf_and_fold_into_earlier_calls(monkeypatch):
    x = torch.randn(300, 40)
    x[250, 9] = x[1, 7] = float("nan")
    x[:, 21] = float("-inf")  # a whole unit at -inf: its max is -inf
    x[:, 13] = -torch.rand(300) - 1  # never positive
    x[0, 17] = float("inf")
    spec = _spec(x, KindInfo(Kind.RELU), -1, bins=0)
    got = _device_activation(x, spec)["units"]
    want = x.amax(dim=0)  # plain torch: NaN propagates
    assert _exact(got, want)
    assert torch.isnan(got).nonzero().flatten().tolist() == [7, 9]
    # A second call of the same layer in the step folds its maxima into the same rows.
    rows = triton_backend.ForwardRows(
        torch.zeros(4, dtype=torch.float64),
        torch.full((2,), float("-inf")),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2048, dtype=torch.int64),
        got.clone(),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
        0,
    )
    y = torch.full((5, 40), -0.5)
    y[2, 21] = 2.0
    y[3, 7] = 1.0
    stats.accumulate_activation(y, spec, rows)
    assert rows.units is not None
    assert rows.units[21] == 2.0
    assert torch.isnan(rows.units[7])  # NaN stays once seen
    assert rows.units[13] == -0.5
    assert rows.maxes.tolist() == [2.0, 0.5]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_hist", [False, True])
@pytest.mark.parametrize("n", [5, 4096, 10_007])
def test_gradient_launch_equals_the_torch_op_kernels(monkeypatch, n, with_hist, dtype):
    g = _special((n,), dtype, None) if n > 13 else (torch.randn(n) * 1e3).to(dtype)
    if n <= 13:
        g[1] = float("nan")
        g[3] = float("-inf")
    rows = triton_backend.BackwardRows(
        torch.zeros(3, dtype=torch.float64),
        torch.full((2,), float("-inf")),
        torch.zeros(2048, dtype=torch.int64) if with_hist else None,
    )
    before = triton_backend.LAUNCHES["gradient"]
    assert stats.fusable(g)
    stats.accumulate_gradient(g, rows)
    assert triton_backend.LAUNCHES["gradient"] == before + 1
    _torch_ops(monkeypatch)
    sums, maxes = torch.zeros(3), torch.zeros(2)
    hist = stats.summarize_gradient(
        stats.as_float32(g, "g"),  # type: ignore[arg-type]
        sums.unbind(0),
        maxes.unbind(0),
        with_hist,
        stats.Scratch(),
    )
    assert rows.sums[1:].tolist() == sums[1:].tolist()  # non-finite and NaN counts
    assert _exact(rows.maxes, torch.stack([maxes[0], -maxes[1]]))
    assert _same_hist(rows.hist, hist, dtype)
    finite = g.double()[torch.isfinite(g)]
    if finite.numel() == n:
        assert rows.sums[0].item() == pytest.approx(finite.square().sum().item(), rel=1e-6)


def test_backend_choice_and_switch(monkeypatch):
    """Auto: CUDA tensors only (CPU ones keep the fused C kernels, triton not even asked);
    0: never; force: CPU tensors too, in the interpreter. Half precision is read as it is."""
    cpu_bf16 = torch.randn(8, 4, dtype=torch.bfloat16)
    assert stats.as_float32(cpu_bf16, "x") is cpu_bf16  # forced: the kernels read bf16
    assert triton_backend.takes(torch.randn(8, 4).t())  # dense, transposed
    assert not triton_backend.takes(torch.randn(8, 4)[:, ::2])  # gaps: the torch-op kernels
    assert not triton_backend.takes(torch.zeros(0, 4))
    assert not triton_backend.takes(torch.randn(4, dtype=torch.float64))
    monkeypatch.setattr(triton_backend, "MODE", "auto")
    assert not triton_backend.enabled_for(torch.device("cpu"))
    assert stats.as_float32(cpu_bf16, "x").dtype == torch.float32  # type: ignore[union-attr]
    monkeypatch.setattr(triton_backend, "MODE", "sometimes")
    with pytest.raises(ValueError, match="ACTMON_TRITON is 'sometimes'; allowed values are"):
        triton_backend.enabled_for(torch.device("cuda"))
    monkeypatch.setattr(triton_backend, "MODE", "force")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 as well"):
        triton_backend.enabled_for(torch.device("cpu"))


def test_cpu_training_never_asks_for_triton():
    """On a CPU, with the default switch, the backend stays out of the way: it never imports
    triton nor its kernels (torch._dynamo may import triton itself), the C kernels do the work."""
    code = (
        "import sys, torch, actmon\n"
        "from actmon import triton_backend\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())\n"
        "mon = actmon.watch(m, log_every=2, sample_every=1)\n"
        "for _ in range(2):\n"
        "    m(torch.randn(3, 4)).sum().backward(); mon.step()\n"
        "mon.close()\n"
        "print(triton_backend._triton.cache_info().currsize, triton_backend.LAUNCHES.total(),"
        " 'actmon._triton_kernels' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ACTMON_TRITON", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 0 False"


class _Counting:
    """Forward and output-gradient calls of every leaf module, counted by our own hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = 0
        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        self.forward += 1
        if output.requires_grad:
            output.register_hook(self._grad)

    def _grad(self, grad: torch.Tensor) -> None:
        self.backward += 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_launch_per_activation_call_and_per_gradient_call(dtype):
    """Each hook call is one launch of the backend and nothing else of it; unsampled steps
    launch nothing."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(dtype)
    counting = _Counting(model)
    monitor = actmon.watch(model, log_every=4, sample_every=2)
    per_step = []
    for _ in range(4):
        before = dict(triton_backend.LAUNCHES)
        calls = (counting.forward, counting.backward)
        model(torch.randn(10, 6, dtype=dtype)).square().mean().backward()
        monitor.step()
        per_step.append(
            (
                triton_backend.LAUNCHES["activation"] - before.get("activation", 0),
                counting.forward - calls[0],
                triton_backend.LAUNCHES["gradient"] - before.get("gradient", 0),
                counting.backward - calls[1],
            )
        )
    monitor.close()
    assert per_step[0] == per_step[2] == (5, 5, 5, 5)  # sampled: one per call
    assert per_step[1] == per_step[3] == (0, 5, 0, 5)  # unsampled: none


def _train(monkeypatch, device_backend: bool, dtype: torch.dtype) -> list[actmon.Snapshot]:
    """test_direct's mixed model (units, saturation, linear histogram, a transposed output,
    an injected NaN/Inf, softmax through the slot rows) 9 steps, windows of 4."""
    if not device_backend:
        _torch_ops(monkeypatch)
    model = mixed_model().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = actmon.watch(model, opt, log_every=4, sample_every=1, gradients={"histogram": True})
    gen = torch.Generator().manual_seed(5)
    snaps = []
    for _ in range(9):
        loss = model(torch.randn(16, 20, generator=gen).to(dtype)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        snap = monitor.step(loss=loss)
        if snap is not None:
            snaps.append(snap)
    monitor.close()
    snaps.append(monitor.snapshot())
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "MODE", "force")
    return snaps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_snapshots_equal_the_torch_op_path(monkeypatch, dtype):
    before = sum(triton_backend.LAUNCHES.values())
    device = _train(monkeypatch, True, dtype)
    assert sum(triton_backend.LAUNCHES.values()) > before
    plain = _train(monkeypatch, False, dtype)
    assert len(device) == len(plain) == 3
    assert_same_snapshots(device, plain)
    last = device[-1]
    assert last.first_nonfinite == actmon.NonFinite(
        step=9, source="activation", layer="5", confirmed_step=9
    )
    assert last.layers["1"].dead_units == 6


_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from actmon import _triton_kernels as kernels

pointer = {"x_ptr": "*bf16", "sum_ptr": "*fp64", "max_ptr": "*fp32", "count_ptr": "*i64"}
pointer |= {"hist_ptr": "*i64", "unit_ptr": "*fp32", "lin_ptr": "*i64", "call_ptr": "*i64"}
ints = {k: "i32" for k in ("n", "R", "C", "units", "position")}
floats = {k: "fp32" for k in ("lo", "hi", "lin_low", "lin_scale")}
constants = {"UNITS": 2, "SAT": 3, "LIN_BINS": 64, "LIN_BLOCK": 128}
constants |= {"BLOCK_R": 64, "BLOCK_C": 64, "HALF": 1}
signature = pointer | ints | floats | dict.fromkeys(constants, "constexpr")
target = GPUTarget("cuda", 90, 32)
try:
    built = triton.compile(
        ASTSource(fn=kernels.activation, signature=signature, constexprs=constants),
        target=target,
        options={"num_warps": 8},
    )
except RuntimeError as exc:  # no ptxas shipped with this triton build
    print("skip", exc)
    sys.exit(0)
assert "atom.global" in built.asm["ptx"] and built.asm["cubin"]
signature = {"g_ptr": "*fp16", "n": "i32", "sum_ptr": "*fp64", "max_ptr": "*fp32"}
signature |= {"hist_ptr": "*i64", "HIST": "constexpr", "BLOCK": "constexpr", "HALF": "constexpr"}
constants = {"HIST": 1, "BLOCK": 4096, "HALF": 2}
built = triton.compile(
    ASTSource(fn=kernels.gradient, signature=signature, constexprs=constants),
    target=target,
    options={"num_warps": 8},
)
assert built.asm["cubin"]
print("built")
"""


def test_kernels_compile_for_a_hopper_gpu(tmp_path):
    """Triton's compiler (not the interpreter) accepts the kernels: PTX and a cubin for sm_90,
    built here without a GPU (in a process without TRITON_INTERPRET, which compiles nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    if last.startswith("skip"):
        pytest.skip(f"triton cannot build for sm_90 here: {last}")
    assert last == "built"
