"""Export rules as Prometheus alerting rules, so Alertmanager raises the same alerts.

Each threshold rule becomes a PromQL expression over the exported ``actmon_*`` metrics; ``for:``
is ``for_steps`` times the seconds per training step, and at least one scrape interval.
Rules with no PromQL equivalent are returned as skipped, with the reason.

Labels and annotations are what ``dashboards/alertmanager.yml`` routes on: ``severity``
(critical pages, warning tickets, info goes nowhere) and ``family`` (the metric the rule
thresholds: a critical alert inhibits the warning and info alerts of its family for the same run
and layer); the ``dashboard`` annotation links to the Grafana dashboard with the alert's run (and
layer) preselected.
"""

from __future__ import annotations

import math
import re

import yaml

from actmon.config import Config
from actmon.rules import Rule

# Per-layer metric -> (Prometheus metric, extra label matchers).
_LAYER_METRICS = {
    "dead_fraction": "actmon_dead_fraction",
    "dormant_fraction": "actmon_dormant_fraction",
    "zero_fraction": "actmon_zero_fraction",
    "saturation_fraction": "actmon_saturation_fraction",
    "mean": "actmon_activation_mean",
    "std": "actmon_activation_std",
    "abs_max": "actmon_activation_abs_max",
    "softmax_max_prob": "actmon_softmax_max_prob",
    "softmax_entropy": "actmon_softmax_entropy",
    "grad_norm": "actmon_grad_norm",
    "output_grad_norm": "actmon_output_grad_norm",
    "update_ratio": "actmon_update_ratio",
    "weight_norm": "actmon_weight_norm",
    "nonfinite_units": "actmon_nonfinite_units",
}
_RUN_METRICS = {
    "loss": "actmon_loss",
    "grad_norm_total": "actmon_grad_norm_total",
    "amp_skip_fraction": "actmon_amp_skip_fraction",
    "amp_skipped_steps": "actmon_amp_skipped_steps",
    "loss_scale": "actmon_loss_scale",
    "grad_norm_depth_ratio": "actmon_grad_norm_depth_ratio",
    # Layers' NaN/Inf values and (layer="") steps with a non-finite loss or gradient norm.
    "nonfinite_count": "sum by (run) (increase(actmon_nonfinite_total[{range}]))",
    "grad_norm_spike": (
        "actmon_grad_norm_total / quantile_over_time(0.5, actmon_grad_norm_total[1h] offset"
        " {range})"
    ),
    "loss_spike": "actmon_loss / quantile_over_time(0.5, actmon_loss[1h] offset {range})",
}


def glob_to_re2(glob: str) -> str:
    """An fnmatch glob as an RE2 pattern (Prometheus anchors label regexes itself)."""
    out = []
    for ch in glob:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return "".join(out)


DEFAULT_GRAFANA_URL = "http://localhost:3000"
# Grafana dashboard URLs by uid (dashboards/actmon-layer.json, actmon-overview.json); the run
# and layer are URL-quoted when Prometheus renders the annotation.
_LAYER_DASHBOARD = (
    "{base}/d/actmon-layer/actmon-layer"
    "?var-run={{{{ $labels.run | urlquery }}}}&var-layer={{{{ $labels.layer | urlquery }}}}"
)
_RUN_DASHBOARD = "{base}/d/actmon-overview/actmon-overview?var-run={{{{ $labels.run | urlquery }}}}"


def _duration(seconds: float) -> str:
    seconds = math.ceil(seconds)
    return f"{seconds}s"


def export_rules(
    config: Config,
    step_seconds: float,
    scrape_interval: float,
    grafana_url: str = DEFAULT_GRAFANA_URL,
) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """(the Prometheus rule file as a dict, [(rule, reason skipped)]); ``grafana_url`` is the
    base of the ``dashboard`` annotation's link."""
    base = grafana_url.rstrip("/")
    alerts: list[dict[str, object]] = []
    skipped: list[tuple[str, str]] = []
    lookback = _duration(max(4 * scrape_interval, 60))
    for rule in config.rules:
        expr = _expr(rule, lookback)
        if expr is None:
            skipped.append((rule.name, _why(rule)))
            continue
        entry: dict[str, object] = {
            "alert": f"actmon_{rule.name}",
            "expr": expr,
            "labels": {"severity": rule.severity, "family": rule.metric},
            "annotations": {
                "summary": rule.summary or f"{rule.metric} {rule.op} {rule.threshold:g}",
                "description": _description(rule),
                "runbook": rule.runbook,
                "dashboard": (_RUN_DASHBOARD if rule.run_level else _LAYER_DASHBOARD).format(
                    base=base
                ),
            },
        }
        if rule.for_steps:
            entry["for"] = _duration(max(rule.for_steps * step_seconds, scrape_interval))
        alerts.append(entry)
    skipped.extend(
        (name, "a model check at attach time, not a threshold on a metric")
        for name in ("double_softmax", "saturating_hidden_stack", "init_mismatch")
        if config.checks
    )
    return {"groups": [{"name": "actmon", "rules": alerts}]}, skipped


# The run's first offending layer, looked up when the alert is rendered (the expression sums
# over layers, so the alert itself has no layer label).
_FIRST_LAYER = (
    '{{ with printf "actmon_first_nonfinite_step{run=%q}" $labels.run | query }}'
    "{{ with . | first }} first at step {{ .Value }}"
    '{{ if ne (.Labels.layer) "" }} in layer {{ .Labels.layer }}{{ end }}'
    " ({{ .Labels.source }}){{ end }}{{ end }}"
)


def _description(rule: Rule) -> str:
    """The alert's description; it names only labels its expression keeps (run-level
    expressions keep ``run``, per-layer ones ``run``, ``layer`` and ``kind``)."""
    condition = f"{rule.metric} {rule.op} {rule.threshold:g}"
    if rule.metric == "nonfinite_count":
        return f"run {{{{ $labels.run }}}}: NaN/Inf values{_FIRST_LAYER}"
    if rule.run_level:
        return f"run {{{{ $labels.run }}}}: {condition} (value {{{{ $value }}}})"
    return (
        f"run {{{{ $labels.run }}}} layer {{{{ $labels.layer }}}}: {condition}"
        " (value {{ $value }})"
    )


def _expr(rule: Rule, lookback: str) -> str | None:
    threshold = f"{rule.threshold:g}"
    step_guard = f" and on(run) actmon_step >= {rule.warmup_steps}" if rule.warmup_steps else ""
    if rule.metric in _RUN_METRICS:
        metric = _RUN_METRICS[rule.metric].format(range=lookback)
        return f"({metric}) {rule.op} {threshold}{step_guard}"
    name = _LAYER_METRICS.get(rule.metric)
    matchers = []
    if rule.metric.startswith("quantile_"):
        name = "actmon_activation_quantile"
        matchers.append(f'quantile="{rule.metric.removeprefix("quantile_")}"')
    if name is None:
        return None
    globs = rule.layers.globs
    if globs != ["*"]:
        matchers.append(f'layer=~"{"|".join(glob_to_re2(g) for g in globs)}"')
    if rule.layers.kinds:  # by default the exporter only emits the metric where it applies
        matchers.append(f'kind=~"{"|".join(k.value for k in rule.layers.kinds)}"')
    selector = f"{name}{{{', '.join(matchers)}}}" if matchers else name
    # actmon_layer_info's hidden label marks every layer but the model's output layer.
    hidden = ""
    if rule.layers.hidden_only:
        hidden = ' and on(run, layer) actmon_layer_info{hidden="true"}'

    return f"{selector} {rule.op} {threshold}{hidden}{step_guard}"


def _why(rule: Rule) -> str:
    return f"metric {rule.metric!r} is not exported to Prometheus"


def export_yaml(
    config: Config,
    step_seconds: float,
    scrape_interval: float,
    grafana_url: str = DEFAULT_GRAFANA_URL,
) -> tuple[str, list[tuple[str, str]]]:
    doc, skipped = export_rules(config, step_seconds, scrape_interval, grafana_url)
    return yaml.safe_dump(doc, sort_keys=False, width=100), skipped
