"""Prometheus sink: exposition, isolation between monitors, cardinality, real server round trips."""

from __future__ import annotations

import logging
import math
import socket

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import actmon
from actmon.sinks.prometheus import LAYER_GAUGES
from tests.helpers import (
    fetch_when,
    http_get,
    prom_query,
    start_prometheus,
    start_pushgateway,
    train_steps,
    wait_for,
)


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3), nn.Sigmoid())
    with torch.no_grad():
        model[0].bias[:4] = -50.0  # 4 of 16 ReLU units dead
        model[2].bias.fill_(20.0)  # the sigmoid saturates near 1
    return model


def _train(monitor, model, steps):
    train_steps(monitor, model, steps)


def _prom(**extra):
    return {"store": {"enabled": False}, "prometheus": {"enabled": True, "port": 0, **extra}}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_endpoint_exposes_the_latest_window_with_help_text():
    model = _model()
    with actmon.watch(model, run_name="p1", log_every=3, sample_every=1, sinks=_prom()) as mon:
        _train(mon, model, 6)
        url = mon.prometheus_url
        assert url is not None
        assert url.startswith("http://127.0.0.1:")
        snap = mon.snapshot()
        text = fetch_when(url, 'actmon_step{run="p1"} 6.0')
    samples = _samples(text)
    relu = snap.layers["1"]
    labels = (("kind", "relu"), ("layer", "1"), ("run", "p1"))
    assert samples[("actmon_dead_fraction", labels)] == relu.dead_fraction == 4 / 16
    assert samples[("actmon_activation_mean", labels)] == relu.mean
    assert samples[("actmon_zero_fraction", labels)] == relu.zero_fraction
    assert (
        samples[("actmon_activation_quantile", (*labels[:2], ("quantile", "0.5"), labels[2]))]
        == relu.quantiles[0.5]
    )
    sig = (("kind", "sigmoid"), ("layer", "3"), ("run", "p1"))
    assert samples[("actmon_saturation_fraction", sig)] == snap.layers["3"].saturation_fraction
    assert samples[("actmon_loss", (("run", "p1"),))] == pytest.approx(snap.loss)
    assert (
        samples[
            (
                "actmon_nonfinite_total",
                (*labels[:2], ("run", "p1"), ("tensor", "activation"), ("value", "nan")),
            )
        ]
        == 0
    )
    assert ("actmon_overhead_seconds_total", (("run", "p1"),)) in samples
    for name in LAYER_GAUGES:
        assert f"# HELP {name} " in text
    assert "# TYPE actmon_nonfinite_total counter" in text


def test_two_monitors_in_one_process_do_not_collide():
    a, b = _model(), _model()
    with (
        actmon.watch(a, run_name="a", log_every=2, sinks=_prom()) as ma,
        actmon.watch(b, run_name="b", log_every=2, sinks=_prom()) as mb,
    ):
        _train(ma, a, 2)
        _train(mb, b, 2)
        assert ma.prometheus_url != mb.prometheus_url
        ta = fetch_when(ma.prometheus_url, "actmon_step")
        tb = fetch_when(mb.prometheus_url, "actmon_step")
    assert 'run="a"' in ta
    assert 'run="b"' not in ta
    assert 'run="b"' in tb


def test_port_in_use_fallback_disable_and_error(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        model = _model()
        with caplog.at_level(logging.WARNING, logger="actmon"):
            with actmon.watch(model, sinks=_prom(port=port)) as mon:
                assert mon.prometheus_url is not None
                assert f":{port}/" not in mon.prometheus_url
            with actmon.watch(model, sinks=_prom(port=port, port_in_use="disable")) as mon:
                assert mon.prometheus_url is None
        assert any(f"127.0.0.1:{port} is not available" in r.getMessage() for r in caplog.records)
        with pytest.raises(
            actmon.ConfigError,
            match=rf"'sinks.prometheus.port': 127.0.0.1:{port}"
            r" is not available",
        ):
            actmon.watch(model, sinks=_prom(port=port, port_in_use="error"))
        assert all(not m._forward_hooks for m in model.modules())  # nothing was attached


def test_layer_series_are_bounded_worst_first(caplog):
    model = _model()  # layers 0..3; the dead ReLU and saturated sigmoid are the worst
    with (
        caplog.at_level(logging.WARNING, logger="actmon"),
        actmon.watch(model, log_every=2, sample_every=1, sinks=_prom(max_layer_series=3)) as mon,
    ):
        _train(mon, model, 4)
        text = fetch_when(mon.prometheus_url, "actmon_step")
    layers = {s[1] for s in _samples(text) if s[0] == "actmon_activation_mean"}
    names = {dict(labels)["layer"] for labels in layers}
    assert names == {"1", "3", "_other"}
    assert sum("exceed max_layer_series=3" in r.getMessage() for r in caplog.records) == 1


def test_real_prometheus_scrapes_values_equal_to_the_snapshot(tmp_path):
    model = _model()
    with actmon.watch(model, run_name="scraped", log_every=3, sample_every=1, sinks=_prom()) as mon:
        target = mon.prometheus_url.removeprefix("http://").removesuffix("/metrics")
        server = start_prometheus(tmp_path, [target])
        try:
            _train(mon, model, 9)
            snap = mon.snapshot()
            query = 'actmon_dead_fraction{run="scraped",layer="1"}'

            def scraped():
                result = prom_query(server, 'actmon_step{run="scraped"}')
                return result and float(result[0]["value"][1]) == 9.0

            wait_for(scraped, what="Prometheus to scrape the last window")
            dead = prom_query(server, query)
            assert float(dead[0]["value"][1]) == snap.layers["1"].dead_fraction
            mean = prom_query(server, 'actmon_activation_mean{run="scraped",layer="2"}')
            assert math.isclose(float(mean[0]["value"][1]), snap.layers["2"].mean, rel_tol=1e-12)
            q = prom_query(
                server, 'actmon_activation_quantile{run="scraped",layer="0",quantile="0.95"}'
            )
            assert float(q[0]["value"][1]) == pytest.approx(snap.layers["0"].quantiles[0.95])
        finally:
            server.stop()


def test_pushgateway_receives_each_window_and_the_last_at_close(tmp_path):
    gateway = start_pushgateway(tmp_path)
    try:
        model = _model()
        with actmon.watch(
            model,
            run_name="batch",
            log_every=2,
            sample_every=1,
            sinks={
                "store": {"enabled": False},
                "prometheus": {
                    "enabled": True,
                    "mode": "pushgateway",
                    "pushgateway_url": gateway.url,
                },
            },
        ) as mon:
            _train(mon, model, 5)
        snap = mon.snapshot()
        assert mon.errors == {}
        samples = _samples(http_get(gateway.url + "/metrics"))
        grouping = (("instance", ""), ("job", "actmon"))
        labels = tuple(sorted((("kind", "relu"), ("layer", "1"), ("run", "batch"), *grouping)))
        assert samples[("actmon_dead_fraction", labels)] == snap.layers["1"].dead_fraction
        assert samples[("actmon_step", tuple(sorted((("run", "batch"), *grouping))))] == 5
        # And a real Prometheus scraping the gateway sees the same values.
        server = start_prometheus(
            tmp_path / "p", [gateway.url.removeprefix("http://")], honor_labels=True
        )
        try:
            got = wait_for(
                lambda: prom_query(server, 'actmon_step{run="batch"}'),
                what="Prometheus to scrape the Pushgateway",
            )
            assert float(got[0]["value"][1]) == 5.0
        finally:
            server.stop()
    finally:
        gateway.stop()
