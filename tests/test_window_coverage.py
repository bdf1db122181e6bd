"""Every window tells the whole story: with the default config a real Prometheus sees every
per-layer series at every scrape and the exported alerts go pending then firing without
resets; a NaN first seen on an unsampled step is named, within a window, by the alert, the
Snapshot, the store, the gate and the report."""

from __future__ import annotations

import time

import torch
from click.testing import CliRunner
from torch import nn

import actmon
from actmon.cli import main
from actmon.config import load_config
from actmon.report import write_report
from actmon.rules_export import export_yaml
from tests.helpers import http_get, prom_query, start_prometheus, wait_for

STEP_SECONDS = 0.03  # the paced training step: a 20-step window takes about 0.6 s
SCRAPE = "500ms"  # so every window is scraped at least once
PER_LAYER = (
    "actmon_dead_fraction",
    "actmon_zero_fraction",
    "actmon_activation_mean",
    "actmon_activation_quantile",
    "actmon_grad_norm",
    "actmon_output_grad_norm",
    "actmon_layer_info",
)


def _dead_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:8] = -100.0  # half the ReLU units can never fire: dead_units holds
    return model


def _alerts(server, name: str, layer: str) -> list[dict]:
    import json

    body = json.loads(http_get(f"{server.url}/api/v1/alerts"))
    return [
        a
        for a in body["data"]["alerts"]
        if a["labels"]["alertname"] == name and a["labels"].get("layer") == layer
    ]


def test_default_config_series_never_gap_and_alerts_pend_then_fire(tmp_path):
    config = load_config(None)
    assert (config.log_every, config.sample_every) == (20, 20)  # the defaults under test
    rules, _ = export_yaml(config, STEP_SECONDS, 0.5)
    rule_file = tmp_path / "alerts.yml"
    rule_file.write_text(rules)
    model = _dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks = {"store": {"enabled": False}, "prometheus": {"enabled": True, "port": 0}}
    seen: list[tuple[str, str]] = []  # (state, activeAt) of actmon_dead_units{layer="1"}
    with actmon.watch(model, optimizer=opt, run_name="cover", sinks=sinks) as monitor:
        target = monitor.prometheus_url.removeprefix("http://").removesuffix("/metrics")
        server = start_prometheus(
            tmp_path / "prom", [target], interval=SCRAPE, rule_files=[rule_file]
        )
        try:
            # Prometheus hands targets to its scrape loop a few seconds after it starts.
            wait_for(lambda: prom_query(server, "up"), what="Prometheus' first scrape")
            for step in range(1, 301):
                start = time.monotonic()
                loss = model(torch.randn(8, 6)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                monitor.step(loss=loss)
                if step % 10 == 0:
                    seen += [
                        (a["state"], a["activeAt"])
                        for a in _alerts(server, "actmon_dead_units", "1")
                    ]
                time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - start)))

            def scraped_last():
                result = prom_query(server, 'actmon_step{run="cover"}')
                return result and float(result[0]["value"][1]) == 300.0

            wait_for(scraped_last, what="the last window to be scraped")
            scrapes = prom_query(server, 'count_over_time(actmon_step{run="cover"}[1h])')
            total = float(scrapes[0]["value"][1])
            per_layer = {
                (metric, r["metric"]["layer"]): float(r["value"][1])
                for metric in PER_LAYER
                for r in prom_query(server, f'count_over_time({metric}{{run="cover"}}[1h])')
            }
        finally:
            server.stop()
    assert total >= 15  # every one of the 15 windows scraped at least once
    assert {("actmon_dead_fraction", "1"), ("actmon_activation_mean", "0")} <= set(per_layer)
    assert ("actmon_grad_norm", "2") in per_layer
    gaps = {key: count for key, count in per_layer.items() if count != total}
    assert gaps == {}, f"series with fewer samples than the {total:g} scrapes: {gaps}"
    states = [state for state, _ in seen]
    assert "pending" in states
    assert "firing" in states
    assert states.index("pending") < states.index("firing")
    assert len({active for _, active in seen}) == 1, f"the alert was reset: {seen}"
    print(f"scrapes {total:g}, per-layer series {len(per_layer)}, alert observations {len(seen)}")


def test_nan_at_an_unsampled_step_is_named_everywhere_within_a_window(tmp_path):
    model = _dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    store = tmp_path / "nan" / "actmon.db"
    sinks = {"store": {"path": str(store)}}
    with actmon.watch(model, optimizer=opt, run_name="nan", sinks=sinks) as monitor:
        for step in range(1, 81):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 25:  # after step 25, layer 0's weights are NaN: step 26 is unsampled
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))
            monitor.step(loss=loss)
            if step == 40:
                assert monitor.snapshot().first_nonfinite == actmon.NonFinite(26, "loss")
    first = actmon.NonFinite(step=26, source="loss", layer="0", confirmed_step=41)
    assert monitor.first_nonfinite == first
    assert monitor.history[2].first_nonfinite == first  # the window of steps 41-60
    fired = [(a.layer, a.first_seen, a.step) for a in monitor.alerts if a.rule == "nonfinite"]
    assert fired == [(None, 26, 26), ("0", 26, 41)]
    with actmon.store.open(store) as db:
        assert actmon.store.first_nonfinite(db.alerts()) == actmon.store.FirstNonFinite(26, "0", 41)
    gate = CliRunner().invoke(main, ["gate", "--store", str(store)])
    assert gate.exit_code == 1
    output = " ".join(gate.output.split())  # the console wraps long lines
    assert "first non-finite at step 26, in layer '0' (layer found at step 41)" in output
    report = write_report(store, tmp_path / "report.html")
    assert "step 26, in layer 0 (layer found at step 41)" in report.read_text()
