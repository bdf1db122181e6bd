"""`actmon rules export`: valid Prometheus rules (promtool check) that fire as the engine does
(promtool test rules) for the dead-unit, NaN and exploding-gradient rules."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import quote_plus

import yaml
from click.testing import CliRunner

from actmon.cli import main
from actmon.rules import DEFAULT_RULES
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
    rules = {r["alert"]: r for r in doc["groups"][0]["rules"]}
    # Every rule of the default pack is exported; only the attach-time model checks are not.
    assert set(rules) == {f"actmon_{rule.name}" for rule in DEFAULT_RULES}
    assert stderr.splitlines() == [
        f"skipped {name}: a model check at attach time, not a threshold on a metric"
        for name in ("double_softmax", "saturating_hidden_stack", "init_mismatch")
    ]
    dead = rules["actmon_dead_units"]
    assert dead["expr"] == "actmon_dead_fraction > 0.3"
    assert dead["for"] == "100s"
    assert dead["labels"] == {"severity": "warning", "family": "dead_fraction"}
    assert rules["actmon_saturation"]["expr"] == (
        'actmon_saturation_fraction > 0.5 and on(run, layer) actmon_layer_info{hidden="true"}'
    )
    assert rules["actmon_vanishing_gradients"]["expr"] == (
        "(actmon_grad_norm_depth_ratio) < 0.0001"
    )
    # Run-level expressions drop the layer label: their descriptions do not name it.
    for name, rule in rules.items():
        run_level = rule["expr"].startswith("(")
        assert ("$labels.layer" in rule["annotations"]["description"]) is not run_level, name
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout


def _dashboard(labels: dict[str, str]) -> str:
    """The link Prometheus renders: Grafana's dashboard with run (and layer) URL-quoted."""
    base = "http://localhost:3000/d/"
    if "layer" not in labels:
        return f"{base}actmon-overview/actmon-overview?var-run={quote_plus(labels['run'])}"
    return (
        f"{base}actmon-layer/actmon-layer?var-run={quote_plus(labels['run'])}"
        f"&var-layer={quote_plus(labels['layer'])}"
    )


def _alert(labels: dict[str, str], description: str, rules: dict, name: str) -> dict:
    annotations = dict(rules[name]["annotations"])
    annotations["description"] = description
    annotations["dashboard"] = _dashboard(labels)
    return {"exp_labels": labels, "exp_annotations": annotations}


def test_promtool_unit_tests_fire_every_exported_rule(tmp_path):
    """Each exported rule fires on the series that should fire it, not before its ``for:``,
    and not on the series that should not (the output layer, a NaN ratio)."""
    promtool = require("promtool")
    path, doc, _ = _export(tmp_path)
    rules = {r["alert"]: r for r in doc["groups"][0]["rules"]}

    def layer(name: str, kind: str) -> dict[str, str]:
        return {"run": "r", "layer": name, "kind": kind}

    def series(metric: str, labels: dict[str, str], values: str) -> dict[str, str]:
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{metric}{{{body}}}", "values": values}

    def expect(name: str, at: str, alerts: list[tuple[dict[str, str], str]]) -> dict:
        fixed = rules[name]["labels"]  # severity and family
        return {
            "eval_time": at,
            "alertname": name,
            "exp_alerts": [
                _alert({**labels, **fixed}, text, rules, name) for labels, text in alerts
            ],
        }

    run = {"run": "r"}
    l1, l2, l3 = layer("1", "relu"), layer("2", "relu"), layer("3", "relu")
    hidden, out = layer("h", "sigmoid"), layer("out", "sigmoid")
    attn, head = layer("attn.softmax#0", "softmax"), layer("head", "softmax")
    w1, w2 = layer("w1", "linear"), layer("w2", "linear")
    input_series = [
        series("actmon_dead_fraction", l1, "0.2x20"),
        series("actmon_dead_fraction", l2, "0.4x20"),
        series("actmon_dead_fraction", l3, "0.6x20"),
        series("actmon_saturation_fraction", hidden, "0.9x20"),
        series("actmon_saturation_fraction", out, "0.9x20"),
        series("actmon_layer_info", {**hidden, "hidden": "true"}, "1x400"),
        series("actmon_layer_info", {**out, "hidden": "false"}, "1x400"),
        series("actmon_softmax_max_prob", attn, "0.99x20"),
        series("actmon_softmax_max_prob", head, "0.999x20"),
        series("actmon_layer_info", {**attn, "hidden": "true"}, "1x400"),
        series("actmon_layer_info", {**head, "hidden": "false"}, "1x400"),
        # A NaN loss on an unsampled step: the layer="" series of the nonfinite counter.
        series(
            "actmon_nonfinite_total",
            {**layer("", ""), "tensor": "loss", "value": "nonfinite"},
            "0 0 0 1 1 1 1 1",
        ),
        series("actmon_first_nonfinite_step", {**run, "layer": "0", "source": "loss"}, "_x3 45x5"),
        series("actmon_loss", run, "1x300 5x10"),
        series("actmon_step", run, "0+20x400"),
        series("actmon_amp_skip_fraction", run, "0.8x10"),
        series("actmon_grad_norm_total", run, "1x300 500x10"),
        series("actmon_grad_norm_depth_ratio", run, "0.00001x20"),
        series("actmon_update_ratio", w1, "0.5x30"),
        series("actmon_update_ratio", w2, "0.0000001x30"),
        series("actmon_update_ratio", layer("w3", "linear"), " ".join(["NaN"] * 30)),  # NaN weights
    ]

    def on_layer(labels: dict[str, str], condition: str, value: str) -> tuple[dict, str]:
        return labels, f"run r layer {labels['layer']}: {condition} (value {value})"

    def on_run(condition: str, value: str) -> tuple[dict, str]:
        return run, f"run r: {condition} (value {value})"

    tests = [
        expect("actmon_dead_units", "1m", []),  # for: 100s
        expect(
            "actmon_dead_units_concerning",
            "3m",
            [
                on_layer(lab, "dead_fraction > 0.1", v)
                for lab, v in ((l1, "0.2"), (l2, "0.4"), (l3, "0.6"))
            ],
        ),
        expect(
            "actmon_dead_units",
            "3m",
            [on_layer(lab, "dead_fraction > 0.3", v) for lab, v in ((l2, "0.4"), (l3, "0.6"))],
        ),
        expect("actmon_dead_units_critical", "3m", [on_layer(l3, "dead_fraction > 0.5", "0.6")]),
        expect("actmon_saturation", "3m", [on_layer(hidden, "saturation_fraction > 0.5", "0.9")]),
        expect(
            "actmon_softmax_collapse", "3m", [on_layer(attn, "softmax_max_prob > 0.98", "0.99")]
        ),
        expect("actmon_nonfinite", "30s", []),
        expect(
            "actmon_nonfinite",
            "1m",
            [(run, "run r: NaN/Inf values first at step 45 in layer 0 (loss)")],
        ),
        expect("actmon_loss_divergence", "75m", []),
        expect("actmon_loss_divergence", "77m", [on_run("loss_spike > 2", "5")]),
        expect("actmon_amp_skips_persist", "30s", []),
        expect("actmon_amp_skips_persist", "2m", [on_run("amp_skip_fraction > 0.5", "0.8")]),
        expect("actmon_exploding_gradients", "60m", []),
        expect("actmon_exploding_gradients", "76m", [on_run("grad_norm_spike > 100", "500")]),
        expect(
            "actmon_vanishing_gradients", "3m", [on_run("grad_norm_depth_ratio < 0.0001", "1e-05")]
        ),
        expect("actmon_update_ratio_high", "2m", [on_layer(w1, "update_ratio > 0.1", "0.5")]),
        expect("actmon_update_ratio_low", "3m", []),  # for: 200s
        expect("actmon_update_ratio_low", "5m", [on_layer(w2, "update_ratio < 1e-06", "1e-07")]),
    ]
    tested = {t["alertname"] for t in tests}
    assert tested == set(rules)  # every exported rule has a unit test
    spec = {
        "rule_files": [str(path)],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": input_series, "alert_rule_test": tests}],
    }
    test_file = tmp_path / "tests.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Globs that broke the file or matched the wrong layers: regex metacharacters, PromQL string
# escapes, fnmatch classes (ranges, negation, "]" as a member, reversed ranges, unclosed "[").
HOSTILE_GLOBS = [
    "encoder.*",
    "block[0-3].fc",
    "block[!0-3].fc",
    "a[]]b",
    "a[!]]b",
    "x[z-a]y",
    "x[!z-a]y",
    "unclosed[",
    "q[-a]",
    "r[a-]",
    'quote"d\\back',
    "brace{1,2}(group)|alt+$^",
    "nl\nin\tname",
    "uni-ï¿½-名前-🔥",
    "{{ .Oops }}",
    "pct%25#?",
    "**",
]
HOSTILE_TEXT = [
    "{{ broken",
    "}} also {{ $labels.run ",
    '{{ "x" }} {{{{',
    "{{- trim -}}",
    "ends with {",
    '$value {{$value}} `raw` {{ template "t" }}',
    'unicode 名前 "quoted" \\ back',
]


def _hostile_config():
    from actmon.config import Config
    from actmon.rules import Rule

    rules = [
        Rule(
            name=f"g{i}",
            metric="dead_fraction",
            op=">",
            threshold=0.5,
            layers={"globs": [glob]},
            summary=HOSTILE_TEXT[i % len(HOSTILE_TEXT)],
            runbook=HOSTILE_TEXT[(i + 1) % len(HOSTILE_TEXT)],
        )
        for i, glob in enumerate(HOSTILE_GLOBS)
    ]
    rules.append(
        Rule(
            name='all "{{ x}} 名',
            metric="std",
            op=">",
            threshold=1,
            layers={"globs": HOSTILE_GLOBS[:6]},
        )
    )
    rules.append(Rule(name="q", metric='quantile_0.9"} or vector(1) #', op=">", threshold=1))
    rules += [
        Rule(name=f"t{i}", metric="loss", op="<", threshold=t)
        for i, t in enumerate((float("inf"), float("-inf"), float("nan"), 1e300))
    ]
    return Config(rules=rules, checks=False)


def test_glob_translation_matches_fnmatch():
    """The RE2 pattern means what fnmatchcase means (checked with Python's re, which reads the
    pattern the same way: punctuation escaped, \\xHH, (?s:...)), on hostile and random globs."""
    import fnmatch
    import random
    import re

    from actmon.rules_export import glob_to_re2

    rng = random.Random(0)
    alphabet = "ab.-!]^[*?\\\n"
    globs = [
        *HOSTILE_GLOBS,
        *("".join(rng.choices(alphabet, k=rng.randint(0, 7))) for _ in range(4000)),
    ]
    names = [
        "encoder.0",
        "encoderX0",
        "block2.fc",
        "block7.fc",
        "a]b",
        "acb",
        "x-y",
        "xzy",
        "q-",
        "qa",
        "r-",
        'quote"d\\back',
        "nl\nin\tname",
        "",
        "a",
        "b.",
        "-",
        "]",
        "!",
        "a\nb",
        *("".join(rng.choices("ab.-!]^[\\\n", k=rng.randint(0, 5))) for _ in range(300)),
    ]
    for glob in globs:
        pattern = re.compile(f"(?:{glob_to_re2(glob)})")
        for name in names:
            assert bool(pattern.fullmatch(name)) == fnmatch.fnmatchcase(name, glob), (glob, name)


def test_hostile_globs_and_texts_export_a_valid_file_that_matches_as_fnmatch(tmp_path):
    """promtool loads the whole file, every annotation renders as its literal text, and each
    glob selects the layers fnmatch selects (promtool test rules, real RE2)."""
    import fnmatch

    from actmon.rules_export import export_yaml

    promtool = require("promtool")
    text, _ = export_yaml(_hostile_config(), step_seconds=1, scrape_interval=15)
    path = tmp_path / "alerts.yml"
    path.write_text(text)
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(HOSTILE_GLOBS) + 6} rules found" in check.stdout

    names = [
        "encoder.0",
        "encoderX0",
        "encoder.",
        "block2.fc",
        "block7.fc",
        "a]b",
        "a!b",
        "xzy",
        "xqy",
        "unclosed[",
        "q-",
        "qa",
        "r-",
        'quote"d\\back',
        "brace{1,2}(group)|alt+$^",
        "nl\nin\tname",
        "uni-ï¿½-名前-🔥",
        "{{ .Oops }}",
        "pct%25#?",
        "other",
    ]

    def labels(name: str) -> str:
        from actmon.rules_export import promql_string

        return f'actmon_dead_fraction{{run="r", kind="relu", layer={promql_string(name)}}}'

    doc = yaml.safe_load(text)
    rules = {r["alert"]: r for r in doc["groups"][0]["rules"]}
    tests = []
    for i, glob in enumerate(HOSTILE_GLOBS):
        rule = rules[f"actmon_g{i}"]
        summary, runbook = HOSTILE_TEXT[i % 7], HOSTILE_TEXT[(i + 1) % 7]
        expected = []
        for name in names:
            if fnmatch.fnmatchcase(name, glob):
                exp_labels = {"run": "r", "kind": "relu", "layer": name, "severity": "warning"}
                exp_labels["family"] = "dead_fraction"
                annotations = {
                    "summary": summary,
                    "runbook": runbook,
                    "description": f"run r layer {name}: dead_fraction > 0.5 (value 0.9)",
                    "dashboard": _dashboard({"run": "r", "layer": name}),
                }
                expected.append({"exp_labels": exp_labels, "exp_annotations": annotations})
        assert expected or glob in ("x[z-a]y",), glob  # each glob but the empty class matches
        tests.append({"eval_time": "1m", "alertname": rule["alert"], "exp_alerts": expected})
    spec = {
        "rule_files": [str(path)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": labels(n), "values": "0.9x10"} for n in names],
                "alert_rule_test": tests,
            }
        ],
    }
    test_file = tmp_path / "tests.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
