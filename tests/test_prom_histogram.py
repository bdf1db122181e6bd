"""Activation histograms exported as Prometheus histograms: buckets equal plain-torch counts of
the same outputs, accumulate over the run only from fresh windows, keep a bounded, stable set
of layers, and a 2,000-layer model stays within a documented number of series."""

from __future__ import annotations

import logging

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import actmon
from actmon.sinks.prom_histogram import BUCKET_BOUNDS
from tests.helpers import http_get, wait_for


def _sinks(**prometheus: object) -> dict:
    return {"store": {"enabled": False}, "prometheus": {"enabled": True, "port": 0, **prometheus}}


def _buckets(text: str, layer: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "actmon_activation_bucket" and s.labels["layer"] == layer:
                out[s.labels["le"]] = s.value
    return out


def _scrape_at(url: str, step: int) -> str:
    """The exposition once the window ending at ``step`` reached the sink (its own thread)."""

    def check() -> str | None:
        text = http_get(url)
        for family in text_string_to_metric_families(text):
            if family.name == "actmon_step" and family.samples[0].value == step:
                return text
        return None

    return str(wait_for(check, what=f"actmon_step == {step}"))


def _expected(outputs: list[torch.Tensor]) -> dict[str, float]:
    """Plain torch: x <= b for the negative bounds, x < b for the positive ones (a positive
    bound is the lower edge of the bin above it), everything at +Inf."""
    y = torch.cat([o.reshape(-1) for o in outputs]).double()
    out = {}
    for b in BUCKET_BOUNDS:
        out[repr(b)] = float((y <= b).sum() if b < 0 else (y < b).sum())
    out["+Inf"] = float(y.numel())
    return out


def test_buckets_equal_plain_torch_counts_and_accumulate_over_windows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh())
    with torch.no_grad():
        model[0].weight.mul_(300.0)  # outputs spanning many powers of 4, both signs
    inputs = [torch.randn(16, 4) for _ in range(4)]
    with actmon.watch(
        model, log_every=2, sample_every=1, sinks=_sinks(histogram_layers=["0"])
    ) as mon:
        for i, x in enumerate(inputs):
            model(x).sum().backward()
            mon.step(loss=1.0)
            if i == 1:
                first = _buckets(_scrape_at(mon.prometheus_url, 2), "0")
        text = _scrape_at(mon.prometheus_url, 4)
        final = _buckets(text, "0")
        with torch.no_grad():
            outputs = [model[0](x) for x in inputs]
    assert first == _expected(outputs[:2])  # the first window
    assert final == _expected(outputs)  # counters: both windows
    assert list(final) == [*(repr(b) for b in BUCKET_BOUNDS), "+Inf"]
    assert len(final) == 27
    assert _buckets(text, "1") == {}  # not in histogram_layers


class _Gated(nn.Module):
    """A branch that runs only when told: its figures are carried through windows it skips."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 5)
        self.branch = nn.Linear(5, 5)
        self.run_branch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return self.branch(h) if self.run_branch else h


def _gated_run(max_layers: int) -> tuple[str, str]:
    """Expositions after step 1 (both layers ran) and step 4 (the branch skipped 3 windows)."""
    model = _Gated()
    sinks = _sinks(histogram_layers=["*"], max_histogram_layers=max_layers)
    with actmon.watch(model, log_every=1, sample_every=1, sinks=sinks) as mon:
        x = torch.randn(4, 3)
        model(x).sum().backward()
        mon.step(loss=1.0)
        first = _scrape_at(mon.prometheus_url, 1)
        model.run_branch = False
        for _ in range(3):
            model(x).sum().backward()
            mon.step(loss=1.0)
        return first, _scrape_at(mon.prometheus_url, 4)


def test_a_carried_layer_adds_nothing():
    first, last = _gated_run(max_layers=2)
    counts = {
        name: (_buckets(first, name)["+Inf"], _buckets(last, name)["+Inf"])
        for name in ("trunk", "branch")
    }
    # 4 x 5 outputs per window: the trunk ran in four windows, the branch in the first only.
    assert counts == {"trunk": (20.0, 80.0), "branch": (20.0, 20.0)}


def test_the_histogram_layer_set_is_bounded_and_stable(caplog):
    with caplog.at_level(logging.WARNING, logger="actmon"):
        first, last = _gated_run(max_layers=1)
    # The first matching layer in forward order holds the one slot for the whole run.
    assert [_buckets(text, "trunk")["+Inf"] for text in (first, last)] == [20.0, 80.0]
    assert _buckets(first, "branch") == _buckets(last, "branch") == {}
    warnings = [r.getMessage() for r in caplog.records if "max_histogram_layers" in r.getMessage()]
    assert warnings == [
        "actmon: histogram export is limited to max_histogram_layers=1 layers; 'branch' and"
        " later matching layers have no histogram series"
    ]


def test_two_thousand_layers_stay_within_the_documented_series_count():
    model = nn.Sequential(*[m for _ in range(1000) for m in (nn.Linear(4, 4), nn.ReLU())])
    counts = {}
    for histograms in ([], ["*"]):
        sinks = _sinks(histogram_layers=histograms)
        with actmon.watch(model, log_every=1, sample_every=1, sinks=sinks) as mon:
            model(torch.randn(2, 4)).sum().backward()
            mon.step(loss=1.0)
            text = _scrape_at(mon.prometheus_url, 1)
        counts[bool(histograms)] = sum(len(f.samples) for f in text_string_to_metric_families(text))
    print(f"2,000 layers: {counts[False]} series; with histogram_layers ['*']: {counts[True]}")
    # max_layer_series (500) bounds the per-layer gauges; the histogram adds 27 buckets for
    # each of max_histogram_layers (32) layers: 864 series. README documents both figures.
    assert counts[True] - counts[False] == 32 * 27
    assert counts[True] <= 11_000
