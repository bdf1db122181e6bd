"""Property tests (hypothesis): kernels against the reference, config loading, the store reader."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import actmon
from actmon import stats, store
from actmon.config import load_config
from actmon.kinds import Kind, KindInfo
from actmon.store import StoreError
from tests.conftest import reference_raw_hist

SPECIAL = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -3e38, 65504.0])
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@st.composite
def tensors(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    values = draw(
        arrays(
            np.float64,
            shape,
            elements=st.one_of(st.floats(-1e4, 1e4, allow_nan=False, width=32), SPECIAL),
        )
    )
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    axis = draw(st.integers(-ndim, ndim - 1))
    return torch.tensor(values).to(dtype), axis


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors())
def test_activation_kernel_matches_reference(case):
    x, axis = case
    xf = stats.as_float32(x, "x")
    ndim = xf.dim()
    unit = axis % ndim
    spec = stats.ActivationSpec(
        KindInfo(Kind.RELU), unit, tuple(d for d in range(ndim) if d != unit), 0.01, 0, None
    )
    sums, maxes = torch.zeros(4, dtype=torch.float64), torch.zeros(2)  # float64 moments
    counts = torch.zeros(2, dtype=torch.int32)
    with torch.no_grad():
        hist, unit_max, _ = stats.summarize_activation(
            xf, spec, sums.unbind(0), maxes.unbind(0), counts.unbind(0), stats.Scratch()
        )
    ref = xf.double()
    # Counts are exact.
    assert int(hist.sum()) == x.numel()
    assert int(hist[list(stats.NAN_BINS)].sum()) == int(torch.isnan(ref).sum())
    assert int(hist[stats.POS_INF_BIN]) == int((ref == np.inf).sum())
    assert int(hist[stats.NEG_INF_BIN]) == int((ref == -np.inf).sum())
    assert x.numel() - int(counts[0]) == int((ref == 0).sum())
    finite_bins = np.ones(2048, dtype=bool)
    finite_bins[list(stats.NAN_BINS)] = False
    np.testing.assert_array_equal(hist.numpy()[finite_bins], reference_raw_hist([xf])[finite_bins])
    # Extrema and per-unit maxima follow torch (NaN propagates); moments on finite data.
    torch.testing.assert_close(
        unit_max, xf.movedim(unit, -1).reshape(-1, xf.shape[unit]).amax(0), equal_nan=True
    )
    if torch.isfinite(ref).all():
        assert float(maxes[0]) == float(ref.max())
        assert float(maxes[1]) == float(ref.min())
    # Moments are rebuilt in float64 (around a value of each block, or from std_mean): finite
    # and accurate for any finite float32 data, 3e38 included.
    if torch.isfinite(ref).all():
        assert float(sums[0]) == pytest.approx(float(ref.sum()), rel=1e-4, abs=1e-2)
        assert float(sums[1]) == pytest.approx(float((ref**2).sum()), rel=1e-4, abs=1e-2)


def _config_error(source: object) -> str | None:
    """The ConfigError message loading ``source`` gives, None when it loads."""
    try:
        load_config(source)  # type: ignore[arg-type]
    except actmon.ConfigError as exc:
        return str(exc)
    return None


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(10**6), 10**6)
        | st.floats(allow_nan=True)
        | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "log_every",
                        "sample_every",
                        "histogram",
                        "rules",
                        "sinks",
                        "kinds",
                        "quantiles",
                        "gate",
                        "x",
                        "store",
                        "min_exp",
                        "enabled",
                        "name",
                        "metric",
                    ]
                ),
                children,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
def test_config_documents_only_ever_fail_with_a_config_error(doc):
    message = _config_error(doc if isinstance(doc, dict) else {"log_every": doc})
    if message is not None:  # anything but a ConfigError would have propagated
        assert "field '" in message or "config" in message


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_files_only_fail_with_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    _config_error(path)  # a ConfigError or nothing: any other exception fails the test


@functools.lru_cache(maxsize=1)
def _good_store() -> bytes:
    """A real store's bytes (made once; not a fixture, so failing examples stay printable)."""
    path = Path(tempfile.mkdtemp(prefix="actmon-fuzz-")) / "good.db"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    with actmon.watch(
        model, log_every=2, sample_every=1, sinks={"store": {"path": str(path)}}
    ) as monitor:
        for _ in range(6):
            model(torch.randn(3, 4)).sum().backward()
            monitor.step(loss=torch.tensor(1.0))
    data = path.read_bytes()
    shutil.rmtree(path.parent)
    return data


_counter = iter(range(10**9))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=20),
)
def test_truncated_or_corrupted_stores_give_a_clear_error(tmp_path, cut, flips):
    blob = bytearray(_good_store())
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    for where, value in flips:
        if blob:
            blob[int(where * len(blob))] = value
    path = tmp_path / f"fuzz-{next(_counter)}.db"
    path.write_bytes(bytes(blob))
    try:
        with store.open(path) as db:
            db.run()
            db.windows()
            db.metrics()
            db.alerts()
            for layer in ("0", "1"):
                db.histograms(layer)
    except StoreError:
        pass
    except Exception as exc:  # would be a bug: anything but StoreError escaping the reader
        raise AssertionError(f"{type(exc).__name__} escaped the store reader: {exc}") from exc
