"""What the report shows, read from the run store and shaped for plotting (no statistic of its
own: values, rankings and hints all come from the store, the rule pack and
:func:`actmon.snapshot.health_score`).

Everything here tolerates a store whose JSON columns hold the wrong shapes: such parts are
left out with a note instead of raising.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass, field

from actmon.kinds import Kind
from actmon.rules import DEFAULT_RULES, METRIC_KINDS, OPS, Rule
from actmon.snapshot import health_score
from actmon.store import RunInfo, RunStore, StoredAlert, Window

# Per-layer fractions the health score and the worst-layers table read, by the kinds they apply
# to (the rule pack's default selection).
HEALTH_METRICS = ("dead_fraction", "dormant_fraction", "saturation_fraction")
# Per-layer NaN/Inf counters, whose sum is the layer's ``LayerStats.nonfinite_count``.
NONFINITE_METRICS = (
    "nan_count",
    "posinf_count",
    "neginf_count",
    "output_grad_nan_count",
    "output_grad_inf_count",
)
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}

Series = list[tuple[int, float]]


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # the stored kind, "?" when the store does not say


@dataclass
class RunData:
    """One run of a store: its record, windows, alerts and layers, read once."""

    info: RunInfo
    windows: list[Window]
    alerts: list[StoredAlert]
    layers: list[Layer]  # forward order
    rules: list[Rule]
    notes: list[str] = field(default_factory=list)  # parts of the store that were unusable

    @property
    def name(self) -> str:
        return self.info.run

    @property
    def kinds(self) -> dict[str, str]:
        return {layer.name: layer.kind for layer in self.layers}

    @property
    def span(self) -> tuple[int, int]:
        """The run's steps on a time axis: from before the first window to its last step."""
        if not self.windows:
            return (0, 1)
        start = min(w.first_step for w in self.windows) - 1
        return (start, max(self.windows[-1].step, start + 1))


def read_run(db: RunStore, run: str | None) -> RunData:
    info = db.run(run)
    notes: list[str] = []
    layers = _layers(info.layers, notes)
    if not layers:  # no usable layer list: the layers that have metrics, in their first order
        seen: dict[str, None] = {}
        for _, layer, _, _ in db.metrics(run=info.run):
            if layer:
                seen.setdefault(layer)
        layers = [Layer(name, "?") for name in seen]
    return RunData(
        info, db.windows(info.run), db.alerts(info.run), layers, _rules(info.config, notes), notes
    )


def _layers(stored: object, notes: list[str]) -> list[Layer]:
    """The store's layer list (``model_json``): a list of objects with a string ``name``."""
    if not isinstance(stored, list):
        if stored:
            notes.append(
                f"the run's layer list (model_json) is a {type(stored).__name__}, not a list of"
                " layers: layers are taken from the stored metrics, their kinds are unknown"
            )
        return []
    out: list[Layer] = []
    skipped = 0
    for item in stored:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            skipped += 1
            continue
        kind = item.get("kind")
        out.append(Layer(name, kind if isinstance(kind, str) and kind else "?"))
    if skipped:
        notes.append(
            f"{skipped} entr{'y' if skipped == 1 else 'ies'} of the run's layer list (model_json)"
            " had no layer name and were left out"
        )
    return out


def _rules(config: object, notes: list[str]) -> list[Rule]:
    """The run's own rule pack (stored with its config); the default pack when unreadable."""
    stored = config.get("rules") if isinstance(config, dict) else None
    if isinstance(stored, list):
        rules = []
        for item in stored:
            try:
                rules.append(Rule.model_validate(item))
            except ValueError:  # pydantic's ValidationError is a ValueError
                continue
        if rules or not stored:
            return rules
    notes.append("the run's rule pack could not be read: runbook hints are the default pack's")
    return list(DEFAULT_RULES)


def run_series(db: RunStore, run: str, metric: str) -> Series:
    return db.series(metric, "", run)


def layer_series(db: RunStore, run: str, metric: str) -> dict[str, Series]:
    out: dict[str, Series] = defaultdict(list)
    for step, layer, _, value in db.metrics(metric, run=run):
        if layer:
            out[layer].append((step, value))
    return dict(out)


def in_order(series: dict[str, Series], layers: list[Layer]) -> dict[str, Series]:
    """``series`` in forward order (the store returns layers sorted by name)."""
    rank = {layer.name: i for i, layer in enumerate(layers)}
    return dict(sorted(series.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def highest(series: dict[str, Series], most: int) -> dict[str, Series]:
    """The ``most`` series with the highest peak (NaN left out), kept in their given order."""
    if len(series) <= most:
        return series

    def peak(points: Series) -> float:
        return max((v for _, v in points if not math.isnan(v)), default=-math.inf)

    keep = set(sorted(series, key=lambda n: peak(series[n]), reverse=True)[:most])
    return {name: points for name, points in series.items() if name in keep}


def nonfinite_windows(db: RunStore, data: RunData) -> list[tuple[int, int]]:
    """(first step - 1, last step) of every window with a NaN/Inf: in a layer's activations or
    output gradients (``nonfinite_count``), in the loss or in the total gradient norm."""
    bad: set[int] = set()
    for metric in ("nonfinite_count", "loss", "grad_norm_total"):
        for step, value in run_series(db, data.name, metric):
            if not math.isfinite(value) or (metric == "nonfinite_count" and value > 0):
                bad.add(step)
    spans = [(w.first_step - 1, w.last_step) for w in data.windows if w.step in bad]
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:  # adjacent windows make one span
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


@dataclass(frozen=True)
class WorstLayer:
    name: str
    kind: str
    score: float  # the largest health score over the run's windows (NaN/Inf first)
    nonfinite_total: float  # NaN/Inf values over the run (activations and output gradients)
    nonfinite_windows: int  # windows in which the layer had any
    first_nonfinite: tuple[int, int] | None  # the steps of the first window with any
    metric: str | None  # the layer's worst health fraction, None when it has none
    worst: float  # that fraction's largest value over the run, and the window's step
    worst_step: int
    final: float  # its value in the layer's last window
    hint: str


def worst_layers(db: RunStore, data: RunData, limit: int = 10) -> list[WorstLayer]:
    """The least healthy layers, ranked by their worst window's health score (the ordering of
    ``LayerStats.health_score``: any NaN/Inf first, then the worst fraction); ties keep forward
    order. Layers without a health fraction are listed only when they had NaN/Inf values."""
    nonfinite: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for counter in NONFINITE_METRICS:
        for layer, points in layer_series(db, data.name, counter).items():
            for step, value in points:
                if value > 0:
                    nonfinite[layer][step] += value
    fractions = {m: layer_series(db, data.name, m) for m in HEALTH_METRICS}
    order = {layer.name: i for i, layer in enumerate(data.layers)}
    spans = {w.step: (w.first_step, w.last_step) for w in data.windows}
    names = set(nonfinite) | {name for series in fractions.values() for name in series}
    rows = []
    for name in names:
        bad = nonfinite.get(name, {})
        own = {m: dict(fractions[m][name]) for m in HEALTH_METRICS if name in fractions[m]}
        steps = set(bad).union(*own.values())
        score = max(
            (health_score(bad.get(s, 0.0), [v.get(s) for v in own.values()]) for s in steps),
            default=0.0,
        )
        metric: str | None = None
        worst, worst_step, final = math.nan, 0, math.nan
        for m, by_step in own.items():
            finite = [(v, -s) for s, v in by_step.items() if not math.isnan(v)]
            if finite and (metric is None or max(finite)[0] > worst):
                (worst, earliest), metric = max(finite), m  # the earliest step of the maximum
                worst_step, final = -earliest, by_step[max(by_step)]
        if not bad and metric is None:
            continue
        kind = data.kinds.get(name, "?")
        hint = (
            runbook_hint(data, name, kind, "nonfinite_count", sum(bad.values()))
            if bad
            else runbook_hint(data, name, kind, metric or "", worst)
        )
        rows.append(
            WorstLayer(
                name,
                kind,
                score,
                sum(bad.values()),
                len(bad),
                spans.get(min(bad)) if bad else None,
                metric,
                worst,
                worst_step,
                final,
                hint,
            )
        )
    rows.sort(key=lambda r: (-r.score, order.get(r.name, len(order)), r.name))
    return rows[:limit]


def runbook_hint(data: RunData, layer: str, kind: str, metric: str, value: float) -> str:
    """The rule pack's runbook for this layer's metric. Of the rules on ``metric`` that watch
    the layer (by kind and name glob; the run-level rule for ``nonfinite_count``) and of the
    alerts that fired on it: the most severe one the value crosses or that fired; when none
    did, the least severe rule (the first to fire as the value grows)."""
    rules = [r for r in data.rules if r.metric == metric and _watches(r, data, layer, kind)]
    candidates = [
        (_SEVERITY_RANK.get(a.severity, -1), a.runbook)
        for a in data.alerts
        if a.layer == layer and a.metric == metric and a.state == "firing" and a.runbook
    ]
    candidates += [
        (_SEVERITY_RANK[r.severity], r.runbook or r.summary)
        for r in rules
        if math.isfinite(value) and OPS[r.op](value, r.threshold)
    ]
    if candidates:
        return max(candidates, key=lambda c: c[0])[1]
    if not rules:
        return f"No rule in the run's rule pack watches {metric} on {kind} layers."
    chosen = min(rules, key=lambda r: _SEVERITY_RANK[r.severity])
    return chosen.runbook or chosen.summary


def _watches(rule: Rule, data: RunData, layer: str, kind: str) -> bool:
    if rule.run_level:
        return True  # nonfinite_count is a run-level rule naming the first offender
    if rule.layers.hidden_only and data.layers and data.layers[-1].name == layer:
        return False
    try:
        kinds = set(rule.layers.kinds) or METRIC_KINDS.get(rule.metric)
        known = Kind(kind)
    except ValueError:  # a kind this actmon does not know: judge by the globs alone
        kinds, known = None, None
    if kinds is not None and known not in kinds:
        return False
    return any(fnmatch.fnmatchcase(layer, g) for g in rule.layers.globs)
