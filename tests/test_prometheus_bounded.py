"""Prometheus series bounded over the whole run, not only per scrape: layers keep the series
they got, ``_other`` counters never decrease (scraped from the real endpoint and parsed with
prometheus_client's parser), while the worst layers change every window."""

from __future__ import annotations

import logging

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import actmon
from tests.helpers import fetch_when


class Poke(nn.Module):
    """A leaf layer that passes its input on, with NaNs in its own output when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.nans = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        if self.nans:
            y.view(-1)[: self.nans] = float("nan")
        return y


class Fan(nn.Module):
    """Ten Pokes on the same input, so a NaN in one stays in that one."""

    def __init__(self, width: int = 10) -> None:
        super().__init__()
        self.pokes = nn.ModuleList(Poke() for _ in range(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(x).nan_to_num() for p in self.pokes]).sum(0)


def _scrape(url: str, step: int) -> dict[tuple[str, tuple], tuple[str, float]]:
    text = fetch_when(url, f'actmon_step{{run="b"}} {float(step)}')
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = (family.type, sample.value)
    return out


def test_layer_series_stay_put_and_other_counters_never_decrease(caplog):
    model = Fan()
    windows, limit = 14, 3
    sinks = {
        "store": {"enabled": False},
        "prometheus": {"enabled": True, "port": 0, "max_layer_series": limit},
    }
    series_ever: set[tuple[str, tuple]] = set()
    layer_sets = []
    last: dict[tuple[str, tuple], float] = {}
    other_nan = []
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(model, run_name="b", log_every=1, sample_every=1, sinks=sinks) as mon,
    ):
        for k in range(windows):
            # The worst layers move every window: NaNs in two different Pokes each time.
            for j, poke in enumerate(model.pokes):
                poke.nans = j + 1 if j in ((3 * k) % 10, (7 * k + 1) % 10) else 0
            model(torch.randn(4, 5))
            mon.step(loss=1.0)
            scraped = _scrape(mon.prometheus_url, k + 1)
            series_ever |= set(scraped)
            layer_sets.append(
                {dict(labels)["layer"] for name, labels in scraped if name == "actmon_layer_info"}
            )
            for key, (kind, value) in scraped.items():
                if kind == "counter":
                    assert value >= last.get(key, 0.0), (k, key, last.get(key), value)
                    last[key] = value
            other_nan.append(
                sum(
                    v
                    for (name, labels), (_, v) in scraped.items()
                    if name == "actmon_nonfinite_total"
                    and dict(labels)["layer"] == "_other"
                    and dict(labels)["value"] == "nan"
                )
            )
    # The set of labelled layers is fixed from the first window: two layers and _other.
    assert all(layers == layer_sets[0] for layers in layer_sets), layer_sets
    assert len(layer_sets[0]) == limit
    assert "_other" in layer_sets[0]
    # _other's NaN counter grew as the NaNs moved through the aggregated layers, never fell.
    assert other_nan == sorted(other_nan)
    assert other_nan[-1] > other_nan[0]
    # Every layer's NaNs are counted once: own series plus _other equal the total injected.
    injected = sum(
        j + 1 for k in range(windows) for j in range(10) if j in ((3 * k) % 10, (7 * k + 1) % 10)
    )
    counted = sum(
        v
        for (name, labels), v in last.items()
        if name == "actmon_nonfinite_total"
        and dict(labels)["tensor"] == "activation"
        and dict(labels)["value"] == "nan"
        and dict(labels)["layer"].startswith(("pokes", "_other"))
    )
    assert counted == injected
    # Cardinality over the run: per-layer families times 3 layer values, plus run-level ones.
    layer_values = {dict(labels).get("layer") for _, labels in series_ever} - {None, ""}
    assert layer_values == layer_sets[0]
    print(f"series over {windows} windows: {len(series_ever)}; layer values {len(layer_values)}")
    assert sum("exceed max_layer_series=3" in r.getMessage() for r in caplog.records) == 1


def test_every_layer_keeps_a_series_when_they_fit():
    model = Fan(width=4)
    sinks = {
        "store": {"enabled": False},
        "prometheus": {"enabled": True, "port": 0, "max_layer_series": 5},
    }
    with actmon.watch(model, run_name="b", log_every=1, sample_every=1, sinks=sinks) as mon:
        model.pokes[2].nans = 1
        model(torch.randn(4, 5))
        mon.step(loss=1.0)
        scraped = _scrape(mon.prometheus_url, 1)
    layers = {dict(labels)["layer"] for name, labels in scraped if name == "actmon_layer_info"}
    assert layers == {"pokes.0", "pokes.1", "pokes.2", "pokes.3"}
