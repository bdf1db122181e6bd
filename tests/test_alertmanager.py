"""From alert to the person who fixes it: ``dashboards/alertmanager.yml`` run by a real
Alertmanager, fed by a real Prometheus evaluating the exported rules against a real actmon
run, delivering to a webhook receiver that records what a page and a ticket look like."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import actmon
from actmon.config import load_config
from actmon.rules_export import export_yaml
from tests.helpers import (
    Server,
    WebhookReceiver,
    http_get,
    prom_query,
    require,
    start_alertmanager,
    start_prometheus,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
ROUTING = ROOT / "dashboards" / "alertmanager.yml"
STEP_SECONDS = 0.03  # a paced training step: for_steps 100 is a 3 s `for:`
SCRAPE = "500ms"


def _test_config(tmp: Path, receiver: WebhookReceiver) -> Path:
    """The committed routing with only what a test must change: the two placeholder webhook
    URLs point at the recording receiver, and the waits are seconds, not minutes."""
    config = yaml.safe_load(ROUTING.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {"page", "ticket", "blackhole"}
    for name in ("page", "ticket"):
        (hook,) = receivers[name]["webhook_configs"]
        assert hook["url"] == f"http://127.0.0.1:9095/{name}"  # the documented placeholder
        hook["url"] = f"{receiver.url}/{name}"
    config["route"].update(group_wait="3s", group_interval="2s", repeat_interval="1h")
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _am_alerts(server: Server) -> list[dict[str, Any]]:
    return list(json.loads(http_get(f"{server.url}/api/v2/alerts")))


def _post_alerts(server: Server, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        f"{server.url}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_committed_routing_passes_amtool_check_config():
    amtool = require("amtool")
    result = subprocess.run(
        [amtool, "check-config", str(ROUTING)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert " - 3 inhibit rules" in result.stdout
    assert " - 3 receivers" in result.stdout


class _ResidualReLU(nn.Module):
    """stem -> three residual ReLU blocks -> head. Dead blocks pass the stream through their
    skip connections, so the stem keeps its gradient: the incident is dead units alone, with
    no vanishing-gradient warning riding along."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 32)
        self.lins = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for lin, act in zip(self.lins, self.acts, strict=True):
            h = h + act(lin(h))
        return self.head(h)


def test_dead_relu_cascade_is_one_page_the_warning_inhibited_then_resolved(tmp_path):
    torch.manual_seed(0)
    receiver = WebhookReceiver()
    alertmanager = start_alertmanager(tmp_path, _test_config(tmp_path, receiver))
    rules, _ = export_yaml(load_config(None), STEP_SECONDS, 0.5)
    rule_file = tmp_path / "alerts.yml"
    rule_file.write_text(rules)
    model = _ResidualReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks = {"store": {"enabled": False}, "prometheus": {"enabled": True, "port": 0}}
    dead_layers = {"acts.0", "acts.1", "acts.2"}
    biases = [lin.bias.detach().clone() for lin in model.lins]
    prometheus: Server | None = None
    try:
        with actmon.watch(model, optimizer=opt, run_name="cascade", sinks=sinks) as monitor:
            target = monitor.prometheus_url.removeprefix("http://").removesuffix("/metrics")
            prometheus = start_prometheus(
                tmp_path / "prom",
                [target],
                interval=SCRAPE,
                rule_files=[rule_file],
                alertmanagers=[alertmanager.url.removeprefix("http://")],
            )
            wait_for(lambda: prom_query(prometheus, "up"), what="Prometheus' first scrape")
            x, y = torch.randn(64, 6), torch.randn(64, 1)

            def train(until: Any, limit: int) -> None:
                """``limit`` paced steps, or until ``until()`` holds (then it must)."""
                for step in range(limit):
                    start = time.monotonic()
                    loss = (model(x[step % 8 :: 8]) - y[step % 8 :: 8]).pow(2).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    monitor.step(loss=loss)
                    if until is not None and step % 10 == 0 and until():
                        return
                    time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - start)))
                if until is not None:
                    raise AssertionError(f"not seen in {limit} steps: {receiver.received}")

            train(None, 60)  # healthy: nothing fires, nothing is sent
            assert receiver.received == []
            with torch.no_grad():  # the incident: every hidden ReLU block dies at once
                for lin in model.lins:
                    lin.bias.fill_(-100.0)
            train(lambda: receiver.at("/page"), 1500)
            train(None, 100)  # a few more group intervals: nothing else is sent
            incident = [
                dict(am["labels"], state=am["status"]["state"]) for am in _am_alerts(alertmanager)
            ]
            with torch.no_grad():  # healed: the blocks' biases back as they were
                for lin, bias in zip(model.lins, biases, strict=True):
                    lin.bias.copy_(bias)
            train(lambda: any(p["status"] == "resolved" for p in receiver.at("/page")), 1500)
    finally:
        if prometheus is not None:
            prometheus.stop()
        alertmanager.stop()
        receiver.stop()

    pages = receiver.at("/page")
    firing = [p for p in pages if p["status"] == "firing"]
    # One page for the incident: one notification for the run and rule, listing every layer.
    assert len(firing) == 1, pages
    (page,) = firing
    assert page["groupLabels"] == {"alertname": "actmon_dead_units_critical", "run": "cascade"}
    assert page["receiver"] == "page"
    assert {a["labels"]["layer"] for a in page["alerts"]} == dead_layers
    for alert in page["alerts"]:
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["family"] == "dead_fraction"
        assert alert["annotations"]["dashboard"] == (
            "http://localhost:3000/d/actmon-layer/actmon-layer"
            f"?var-run=cascade&var-layer={alert['labels']['layer']}"
        )
        assert alert["annotations"]["runbook"].startswith("Lower the learning rate")
    # The warning (> 30% dead) and the info record (> 10%) of the same family held too, but
    # were inhibited by the critical one: no ticket, and Alertmanager says why.
    assert receiver.at("/ticket") == []
    states = {(a["alertname"], a.get("layer")): a["state"] for a in incident}
    for layer in dead_layers:
        assert states[("actmon_dead_units_critical", layer)] == "active"
        assert states[("actmon_dead_units", layer)] == "suppressed"
        assert states[("actmon_dead_units_concerning", layer)] == "suppressed"
    # Healed: the resolution goes to the same receiver, for the same group.
    resolved = [p for p in pages if p["status"] == "resolved"]
    assert resolved[0]["groupLabels"] == page["groupLabels"]
    assert {a["labels"]["layer"] for a in resolved[0]["alerts"]} == dead_layers
    assert all(a["status"] == "resolved" for a in resolved[0]["alerts"])


def _alert(name: str, severity: str, family: str, run: str, layer: str | None = None) -> dict:
    """An alert labelled as `actmon rules export` labels it."""
    labels = {"alertname": name, "severity": severity, "family": family, "run": run}
    if layer is not None:
        labels["layer"] = layer
    return {"labels": labels, "annotations": {"summary": name}}


@pytest.fixture
def routed(tmp_path):
    receiver = WebhookReceiver()
    server = start_alertmanager(tmp_path, _test_config(tmp_path, receiver))
    yield server, receiver
    server.stop()
    receiver.stop()


def _states(server: Server) -> dict[tuple[str, str, str | None], str]:
    return {
        (a["labels"]["alertname"], a["labels"]["run"], a["labels"].get("layer")): a["status"][
            "state"
        ]
        for a in _am_alerts(server)
    }


def test_routing_matrix_and_nonfinite_inhibits_the_runs_layer_alerts(routed):
    server, receiver = routed
    _post_alerts(
        server,
        [
            # Run "nan": a NaN page, and per-layer alerts it makes meaningless.
            _alert("actmon_nonfinite", "critical", "nonfinite_count", "nan"),
            _alert("actmon_saturation", "warning", "saturation_fraction", "nan", "3"),
            _alert("actmon_dead_units_critical", "critical", "dead_fraction", "nan", "1"),
            # Run "other": its own warning is not silenced by run "nan"'s NaN page.
            _alert("actmon_saturation", "warning", "saturation_fraction", "other", "3"),
            # Info goes nowhere, inhibited or not.
            _alert("actmon_update_ratio_low", "info", "update_ratio", "other", "w"),
        ],
    )
    wait_for(lambda: receiver.at("/page") and receiver.at("/ticket"), what="page and ticket")
    time.sleep(5)  # past group_wait and two group intervals: nothing else arrives
    pages, tickets = receiver.at("/page"), receiver.at("/ticket")
    assert [p["groupLabels"] for p in pages] == [{"alertname": "actmon_nonfinite", "run": "nan"}]
    assert [t["groupLabels"] for t in tickets] == [
        {"alertname": "actmon_saturation", "run": "other"}
    ]
    assert len(receiver.received) == 2  # nothing for info, nothing to a third receiver
    assert _states(server) == {
        ("actmon_nonfinite", "nan", None): "active",
        ("actmon_saturation", "nan", "3"): "suppressed",
        ("actmon_dead_units_critical", "nan", "1"): "suppressed",
        ("actmon_saturation", "other", "3"): "active",
        ("actmon_update_ratio_low", "other", "w"): "active",  # active, routed to the blackhole
    }


def test_amtool_silence_for_a_planned_window(routed):
    server, receiver = routed
    amtool = require("amtool")
    url = f"--alertmanager.url={server.url}"
    added = subprocess.run(
        [
            amtool,
            url,
            "silence",
            "add",
            "run=maintenance",
            "--duration=10m",
            "--comment=planned restart",
            "--author=ci",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    silence_id = added.stdout.strip()
    query = subprocess.run(
        [amtool, url, "silence", "query", "-q"], capture_output=True, text=True, check=True
    )
    assert query.stdout.split() == [silence_id]
    _post_alerts(
        server,
        [
            _alert("actmon_nonfinite", "critical", "nonfinite_count", "maintenance"),
            _alert("actmon_nonfinite", "critical", "nonfinite_count", "live"),
        ],
    )
    wait_for(lambda: receiver.at("/page"), what="the live run's page")
    time.sleep(5)
    assert [p["groupLabels"]["run"] for p in receiver.at("/page")] == ["live"]
    assert _states(server)[("actmon_nonfinite", "maintenance", None)] == "suppressed"
