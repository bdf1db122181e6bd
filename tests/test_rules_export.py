"""`actmon rules export`: valid Prometheus rules (promtool check) that fire as the engine does
(promtool test rules) for the dead-unit, NaN and exploding-gradient rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from click.testing import CliRunner

from actmon.cli import main
from tests.helpers import require

ROOT = Path(__file__).resolve().parents[1]


def _export(tmp_path: Path) -> tuple[Path, dict, str]:
    result = CliRunner().invoke(
        main,
        [
            "rules",
            "export",
            "--config",
            str(ROOT / "configs" / "default.yaml"),
            "--step-seconds",
            "1",
            "--scrape-interval",
            "15",
        ],
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "alerts.yml"
    path.write_text(result.stdout)
    return path, yaml.safe_load(result.stdout), result.stderr


def test_export_is_valid_and_lists_what_it_skipped(tmp_path):
    promtool = require("promtool")
    path, doc, stderr = _export(tmp_path)
    names = [r["alert"] for r in doc["groups"][0]["rules"]]
    assert "actmon_dead_units" in names
    assert "actmon_nonfinite" in names
    dead = next(r for r in doc["groups"][0]["rules"] if r["alert"] == "actmon_dead_units")
    assert dead["expr"] == "actmon_dead_fraction > 0.3"
    assert dead["for"] == "100s"
    assert dead["labels"] == {"severity": "warning"}
    assert "skipped vanishing_gradients: metric 'grad_norm_depth_ratio' is not exported" in stderr
    assert "skipped double_softmax: a model check" in stderr
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout


def test_promtool_unit_tests_fire_the_exported_rules(tmp_path):
    promtool = require("promtool")
    path, doc, _ = _export(tmp_path)
    rules = {r["alert"]: r for r in doc["groups"][0]["rules"]}

    def annotations(name: str, run: str, layer: str) -> dict[str, str]:
        out = dict(rules[name]["annotations"])
        out["description"] = (
            out["description"]
            .replace("{{ $labels.run }}", run)
            .replace("{{ $labels.layer }}", layer)
        )
        return out

    dead_labels = {"run": "r", "layer": "1", "kind": "relu"}
    tests = {
        "rule_files": [str(path)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    {
                        "series": 'actmon_dead_fraction{run="r",layer="1",kind="relu"}',
                        "values": "0.1 0.4x20",
                    },
                    {
                        "series": 'actmon_nonfinite_total{run="r",layer="2",kind="other",'
                        'tensor="activation",value="nan"}',
                        "values": "0 0 0 5 5 5 5 5",
                    },
                    {"series": 'actmon_grad_norm_total{run="r"}', "values": "1x300 500x10"},
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "actmon_dead_units", "exp_alerts": []},
                    {
                        "eval_time": "3m",
                        "alertname": "actmon_dead_units",
                        "exp_alerts": [
                            {
                                "exp_labels": {**dead_labels, "severity": "warning"},
                                "exp_annotations": annotations("actmon_dead_units", "r", "1"),
                            }
                        ],
                    },
                    {"eval_time": "30s", "alertname": "actmon_nonfinite", "exp_alerts": []},
                    {
                        "eval_time": "1m",
                        "alertname": "actmon_nonfinite",
                        "exp_alerts": [
                            {
                                "exp_labels": {"run": "r", "severity": "critical"},
                                "exp_annotations": annotations("actmon_nonfinite", "r", ""),
                            }
                        ],
                    },
                    {
                        "eval_time": "60m",
                        "alertname": "actmon_exploding_gradients",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "76m",
                        "alertname": "actmon_exploding_gradients",
                        "exp_alerts": [
                            {
                                "exp_labels": {"run": "r", "severity": "critical"},
                                "exp_annotations": annotations(
                                    "actmon_exploding_gradients", "r", ""
                                ),
                            }
                        ],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "tests.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
