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
import string

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
    """An fnmatch glob (``fnmatchcase``: ``*``, ``?``, ``[a-c]``, ``[!x]``, everything else
    literal) as an RE2 pattern for a label matcher; Prometheus anchors it itself.

    Every ASCII punctuation character is backslash-escaped and control characters are written
    ``\\xHH``, so the pattern means the same to RE2 and to Python's ``re`` (which the tests
    check it against). It is a pattern, not yet a PromQL string: see :func:`promql_string`.
    """
    parts: list[str] = []
    wild = False  # "." must match a newline as fnmatch's does: wrap in (?s:...)
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            if not parts or parts[-1] != ".*":  # "**" is "*"
                parts.append(".*")
            wild = True
        elif c == "?":
            parts.append(".")
            wild = True
        elif c == "[" and (end := _class_end(glob, i)) is not None:
            negate = glob[i] == "!"
            cls = _re2_class(glob[i + negate : end], negate)
            wild = wild or cls == "."
            parts.append(cls)
            i = end + 1
        else:  # an unclosed "[" is a literal, as in fnmatch
            parts.append(_re2_char(c))
    body = "".join(parts)
    return f"(?s:{body})" if wild else body


def _class_end(glob: str, start: int) -> int | None:
    """The index of the "]" closing the class opened just before ``start`` (fnmatch: a "]"
    right after "[" or "[!" is a member), or None when it is never closed."""
    j = start
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    end = glob.find("]", j)
    return None if end < 0 else end


def _re2_class(body: str, negate: bool) -> str:
    """A bracket expression's members (``a``, ``a-z``; a reversed range is empty, a leading or
    trailing "-" literal) as an RE2 character class."""
    items: list[str] = []
    p = 0
    while p < len(body):
        if p + 2 < len(body) and body[p + 1] == "-":
            lo, hi = body[p], body[p + 2]
            if lo <= hi:  # fnmatch drops reversed ranges
                items.append(f"{_re2_char(lo)}-{_re2_char(hi)}")
            p += 3
        else:
            items.append(_re2_char(body[p]))
            p += 1
    if not items:
        return "." if negate else r"\b\B"  # any character / matches nothing
    return f"[{'^' if negate else ''}{''.join(items)}]"


def _re2_char(c: str) -> str:
    """One character as a literal in RE2 (and Python ``re``), inside or outside a class."""
    if c in string.punctuation:
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02x}"
    return c


def promql_string(value: str) -> str:
    """``value`` as a double-quoted PromQL string literal (Go string escapes)."""
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


_TEMPLATE_OPEN = re.compile(r"\{(?=\{|$)")


def template_text(text: str) -> str:
    """``text`` as literal text in a Go template (Prometheus expands labels and annotations):
    a "{" that could open an action ("{{") is written as the action ``{{ "{" }}``, so any text
    renders as itself and can never break the file."""
    return _TEMPLATE_OPEN.sub('{{ "{" }}', text)


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
            # Labels and annotations are Go templates: every text from the config is escaped.
            "labels": {"severity": rule.severity, "family": template_text(rule.metric)},
            "annotations": {
                "summary": template_text(rule.summary or _condition(rule)),
                "description": _description(rule),
                "runbook": template_text(rule.runbook),
                "dashboard": (_RUN_DASHBOARD if rule.run_level else _LAYER_DASHBOARD).format(
                    base=template_text(base)
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
    condition = template_text(_condition(rule))
    if rule.metric == "nonfinite_count":
        return f"run {{{{ $labels.run }}}}: NaN/Inf values{_FIRST_LAYER}"
    if rule.run_level:
        return f"run {{{{ $labels.run }}}}: {condition} (value {{{{ $value }}}})"
    return (
        f"run {{{{ $labels.run }}}} layer {{{{ $labels.layer }}}}: {condition}"
        " (value {{ $value }})"
    )


def _condition(rule: Rule) -> str:
    return f"{rule.metric} {rule.op} {rule.threshold:g}"


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
        matchers.append(f"quantile={promql_string(rule.metric.removeprefix('quantile_'))}")
    if name is None:
        return None
    globs = rule.layers.globs
    if globs != ["*"]:
        matchers.append(f"layer=~{promql_string('|'.join(glob_to_re2(g) for g in globs))}")
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
