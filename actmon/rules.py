"""Alert rules: declarative thresholds on Snapshot metrics, evaluated once per window.

A rule names a metric (per layer, or run-level), a comparison and a threshold, and how long the
condition must hold (``for_steps``: consecutive windows covering at least that many steps).
The engine keeps one state per (rule, layer): it fires one Alert when the condition has held
long enough, stays quiet while it keeps holding (de-duplicated), and emits a resolved event
when it stops. ``warmup_steps`` silences a rule early in training, ``cooldown_steps`` after a
resolution. Severity ``info`` is for the record, ``warning`` is a ticket, ``critical`` a page.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actmon.errors import ActmonError, ConfigError
from actmon.kinds import Kind
from actmon.snapshot import LAYER_METRICS, RUN_METRICS, LayerInfo, Snapshot

Op = Literal[">", ">=", "<", "<=", "==", "!="]
Severity = Literal["info", "warning", "critical"]
Action = Literal["log", "callback", "raise", "stop"]

_DEFAULT_ACTIONS: tuple[Action, ...] = ("log", "callback")

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}

DERIVED_RUN_METRICS = ("grad_norm_spike", "loss_spike")
RUN_LEVEL = frozenset((*RUN_METRICS, *DERIVED_RUN_METRICS))
EXTRA_LAYER_METRICS = ("abs_max",)  # plus quantile_<q> for each configured quantile

# Which layer kinds a per-layer metric applies to (default selection); absent: every kind.
METRIC_KINDS: dict[str, frozenset[Kind]] = {
    "dead_fraction": frozenset({Kind.RELU, Kind.CLIPPING}),
    "dead_fraction_batch": frozenset({Kind.RELU, Kind.CLIPPING}),
    "dormant_fraction": frozenset({Kind.LEAKY, Kind.SMOOTH_GATED}),
    "saturation_fraction": frozenset({Kind.SIGMOID, Kind.TANH, Kind.CLIPPING}),
    "softmax_max_prob": frozenset({Kind.SOFTMAX}),
    "softmax_entropy": frozenset({Kind.SOFTMAX}),
}

_HISTORY = 50  # windows kept for running medians (spikes)


class AlertError(ActmonError, RuntimeError):
    """Raised by ``monitor.step()`` when a rule with the ``raise`` action fires."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message())
        self.alert = alert


class LayerSelector(BaseModel):
    """Which layers a per-layer rule watches: name globs and/or kinds (both must match)."""

    model_config = ConfigDict(extra="forbid")

    globs: list[str] = Field(default_factory=lambda: ["*"])
    kinds: list[Kind] = Field(default_factory=list)  # empty: the kinds the metric applies to
    hidden_only: bool = False  # leave out the model's last layer (its output layer)


class Rule(BaseModel):
    """One alert rule (YAML under ``rules:``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    metric: str
    layers: LayerSelector = Field(default_factory=LayerSelector)
    op: Op
    threshold: float
    warmup_steps: int = Field(0, ge=0)
    for_steps: int = Field(0, ge=0)
    cooldown_steps: int = Field(0, ge=0)
    severity: Severity = "warning"
    actions: list[Action] = Field(default_factory=lambda: list(_DEFAULT_ACTIONS))
    summary: str = ""
    runbook: str = ""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        known = (*LAYER_METRICS, *EXTRA_LAYER_METRICS, *RUN_LEVEL)
        if value not in known and not value.startswith("quantile_"):
            raise ValueError(
                f"unknown metric {value!r}; metrics are {', '.join(known)} or quantile_<q>"
            )
        return value

    @property
    def run_level(self) -> bool:
        return self.metric in RUN_LEVEL


@dataclass(frozen=True)
class Alert:
    """One alert event: ``state`` is "firing" when it starts, "resolved" when it stops holding."""

    rule: str
    layer: str | None
    severity: Severity
    metric: str
    value: float
    op: str
    threshold: float
    step: int  # the step (window end) of this event
    first_seen: int  # the first step of the window where the condition started holding
    summary: str = ""
    runbook: str = ""
    state: Literal["firing", "resolved"] = "firing"
    actions: tuple[str, ...] = ()

    def message(self) -> str:
        """The event as sentences for people, e.g. "[warning] dead_units on layer 'fc1' at step
        200: dead_fraction is 0.42, above 0.3, since step 101. <summary>. Runbook: <hint>"."""
        where = f" on layer {self.layer!r}" if self.layer else ""
        words = _OP_WORDS.get(self.op, self.op)
        value = f"{self.metric} is {self.value:.4g}"
        if self.state == "resolved":
            return (
                f"[{self.severity}] {self.rule}{where} resolved at step {self.step}: {value}, no"
                f" longer {words} {self.threshold:g}."
            )
        when = "at attach" if self.step == 0 else f"at step {self.step}"
        parts = [f"[{self.severity}] {self.rule}{where} {when}:"]
        if self.metric not in MODEL_CHECK_METRICS or not self.summary:  # a check says it all
            since = f", since step {self.first_seen}" if self.first_seen < self.step else ""
            parts.append(f"{value}, {words} {self.threshold:g}{since}.")
        if self.summary:
            parts.append(_sentence(self.summary))
        if self.runbook:
            parts.append(f"Runbook: {_sentence(self.runbook)}")
        return " ".join(parts)

    def short(self) -> str:
        """One line naming the alert without its text, e.g. "dead_units (warning) on layer
        'fc1', firing since step 200" (status lines; :meth:`message` is printed when it fires)."""
        where = f" on layer {self.layer!r}" if self.layer else ""
        if self.state == "resolved":
            return f"{self.rule} ({self.severity}){where}, resolved at step {self.step}"
        since = "since attach" if self.step == 0 else f"since step {self.step}"
        return f"{self.rule} ({self.severity}){where}, firing {since}"


# How a rule's comparison reads in a sentence ("dead_fraction is 0.42, above 0.3").
_OP_WORDS = {
    ">": "above",
    ">=": "at or above",
    "<": "below",
    "<=": "at or below",
    "==": "equal to",
    "!=": "not equal to",
}

# The metrics of the model checks (actmon.checks): their summary states the finding itself.
MODEL_CHECK_METRICS = frozenset(
    {
        "saturating_hidden_layers",
        "last_layer_softmax",
        "init_scale_ratio",
        "loss_input_is_probability",
    }
)


def _sentence(text: str) -> str:
    """``text`` capitalised and ending in a full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


@dataclass
class _State:
    streak_start: int | None = None  # first step of the consecutive windows that hold
    active: Alert | None = None
    resolved_at: int | None = None


@dataclass
class RuleEngine:
    """Evaluates rules on each Snapshot; returns the Alert events (firing and resolved)."""

    rules: list[Rule]
    layers: list[LayerInfo]
    quantiles: list[float]
    _states: dict[tuple[str, str | None], _State] = field(default_factory=dict)
    _grad_history: deque[float] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    _loss_history: deque[float] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    _selected: dict[str, list[str]] = field(default_factory=dict)  # by rule name

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation at watch() -----------------------------------------------------------
    def validate(self) -> None:
        names = [rule.name for rule in self.rules]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ConfigError(
                f"config field 'rules': rule names must be unique; repeated:"
                f" {', '.join(sorted(duplicated))}"
            )
        qs = {f"quantile_{q:g}" for q in self.quantiles}
        for rule in self.rules:
            if rule.metric.startswith("quantile_") and rule.metric not in qs:
                raise ConfigError(
                    f"rule {rule.name!r}: metric {rule.metric!r} is not a configured quantile;"
                    f" configured: {', '.join(sorted(qs))}"
                )
            narrowed = {"globs", "kinds"} & rule.layers.model_fields_set
            if any("#" in glob for glob in rule.layers.globs):
                continue  # functional layers ("<module>.<fn>#<k>") are found while running
            # A rule that names layers or kinds must match one; with the default selection a
            # metric that applies to no layer of this model (no softmax, say) is simply idle.
            if not rule.run_level and narrowed and not self.selected(rule):
                raise ConfigError(
                    f"rule {rule.name!r}: its layer selector (globs {rule.layers.globs}, kinds"
                    f" {[k.value for k in rule.layers.kinds] or 'default'}) matches no"
                    f" monitored layer for metric {rule.metric!r}"
                )

    def set_layers(self, layers: list[LayerInfo]) -> None:
        """A new layer list (a functional activation was found): selections are redone."""
        self.layers = layers
        self._selected.clear()

    def selected(self, rule: Rule) -> list[str]:
        """Names of the layers a per-layer rule watches (matched once per layer list)."""
        cached = self._selected.get(rule.name)
        if cached is None:
            cached = self._selected[rule.name] = self._select(rule)
        return cached

    def _select(self, rule: Rule) -> list[str]:
        kinds = set(rule.layers.kinds) or METRIC_KINDS.get(rule.metric)
        layers = self.layers[:-1] if rule.layers.hidden_only else self.layers
        return [
            info.name
            for info in layers
            if (kinds is None or info.kind in kinds)
            and any(fnmatch.fnmatchcase(info.name, g) for g in rule.layers.globs)
        ]

    # ---- evaluation per window -----------------------------------------------------------
    def evaluate(self, snap: Snapshot) -> list[Alert]:
        run_values = self._run_values(snap)
        events: list[Alert] = []
        for rule in self.rules:
            if snap.step < rule.warmup_steps:
                continue
            if rule.run_level:
                value = run_values.get(rule.metric)
                layer = (
                    snap.first_nonfinite.layer
                    if (rule.metric == "nonfinite_count" and snap.first_nonfinite)
                    else None
                )
                events.extend(self._update(rule, None, value, snap, layer_label=layer))
                continue
            for name in self.selected(rule):
                stats = snap.layers.get(name)
                value = None
                if stats is not None and not stats.stale(snap.step):  # carried: counted once
                    value = stats.metrics().get(rule.metric)
                events.extend(self._update(rule, name, value, snap))
        return events

    def _run_values(self, snap: Snapshot) -> dict[str, float]:
        values = snap.run_metrics()
        # A non-finite loss or gradient norm on an unsampled step counts too (the sentinel).
        values["nonfinite_count"] = float(
            max(
                snap.nonfinite_count + snap.nonfinite_loss_steps + snap.nonfinite_grad_norm_steps,
                int(bool(snap.first_nonfinite)),
            )
        )
        total = snap.grad_norm_total_max
        if total is not None:
            median = statistics.median(self._grad_history) if self._grad_history else None
            if not math.isfinite(total):
                values["grad_norm_spike"] = math.inf
            elif median:
                values["grad_norm_spike"] = total / median
            if math.isfinite(total):
                self._grad_history.append(total)
        if snap.loss is not None and math.isfinite(snap.loss):
            if self._loss_history:
                median = statistics.median(self._loss_history)
                if median > 0:
                    values["loss_spike"] = snap.loss / median
            self._loss_history.append(snap.loss)
        return values

    def _update(
        self,
        rule: Rule,
        layer: str | None,
        value: float | None,
        snap: Snapshot,
        layer_label: str | None = None,
    ) -> Iterable[Alert]:
        key = (rule.name, layer)
        state = self._states.setdefault(key, _State())
        # No data for this layer in this window, or a value that cannot be compared (a NaN
        # ratio after a fault is not "too low"): neither holds nor breaks.
        if value is None or math.isnan(value):
            return ()
        if (
            state.active is not None
            and state.active.layer is None
            and layer_label is not None
            and snap.first_nonfinite is not None
        ):
            # The run's first non-finite value was seen where no layer was sampled; sampling
            # every step has now named the layer: the alert is re-issued naming it.
            update = replace(
                state.active,
                layer=layer_label,
                step=snap.first_nonfinite.confirmed_step or snap.window[1],
                value=value,
            )
            state.active = update
            return (update,)
        holds = OPS[rule.op](value, rule.threshold)
        first, last = snap.window
        if not holds:
            state.streak_start = None
            if state.active is not None:
                resolved = replace(state.active, state="resolved", step=last, value=value)
                state.active, state.resolved_at = None, last
                return (resolved,)
            return ()
        if state.streak_start is None:
            state.streak_start = first
        covered = last - state.streak_start + 1
        if state.active is not None or covered < rule.for_steps:
            return ()
        if state.resolved_at is not None and last < state.resolved_at + rule.cooldown_steps:
            return ()
        step, first_seen = last, state.streak_start
        if rule.metric == "nonfinite_count" and snap.first_nonfinite is not None:
            step = first_seen = snap.first_nonfinite.step
        alert = Alert(
            rule=rule.name,
            layer=layer if layer is not None else layer_label,
            severity=rule.severity,
            metric=rule.metric,
            value=value,
            op=rule.op,
            threshold=rule.threshold,
            step=step,
            first_seen=first_seen,
            summary=rule.summary,
            runbook=rule.runbook,
            actions=tuple(rule.actions),
        )
        state.active = alert
        return (alert,)


def _rule(**kwargs: object) -> Rule:
    return Rule.model_validate(kwargs)


# The default pack; configs/default.yaml lists the same rules with the reasoning behind each
# threshold (a test keeps the two equal).
DEFAULT_RULES: list[Rule] = [
    _rule(
        name="dead_units_concerning",
        metric="dead_fraction",
        op=">",
        threshold=0.1,
        for_steps=100,
        severity="info",
        summary="over 10% of this layer's units are dead: worth watching (healthy layers keep"
        " under 10%)",
        runbook="If it keeps rising, lower the learning rate or use LeakyReLU/GELU.",
    ),
    _rule(
        name="dead_units",
        metric="dead_fraction",
        op=">",
        threshold=0.3,
        for_steps=100,
        severity="warning",
        summary="over 30% of this layer's units output exactly 0 on every sampled input",
        runbook="Lower the learning rate, use LeakyReLU/GELU, check the init and bias.",
    ),
    _rule(
        name="dead_units_critical",
        metric="dead_fraction",
        op=">",
        threshold=0.5,
        for_steps=100,
        severity="critical",
        summary="most of this layer's units are dead: its capacity is gone",
        runbook="Lower the learning rate, use LeakyReLU/GELU, check the init and bias.",
    ),
    _rule(
        name="saturation",
        metric="saturation_fraction",
        op=">",
        threshold=0.5,
        for_steps=100,
        severity="warning",
        layers={"hidden_only": True},
        summary="most outputs of this hidden layer are saturated: gradients vanish through it",
        runbook="Normalise inputs, add normalisation layers, or use a non-saturating activation.",
    ),
    _rule(
        name="softmax_collapse",
        metric="softmax_max_prob",
        op=">",
        threshold=0.98,
        for_steps=100,
        severity="warning",
        layers={"hidden_only": True},
        summary="this hidden softmax's rows are near one-hot (attention entropy collapse)",
        runbook="Attention entropy collapse precedes divergence: lower the learning rate, "
        "add QK-norm or a logit cap, check the temperature.",
    ),
    _rule(
        name="nonfinite",
        metric="nonfinite_count",
        op=">",
        threshold=0,
        severity="critical",
        summary="NaN or Inf values appeared (the layer is the first offender in forward order)",
        runbook="Check the named layer's inputs and the learning rate; use gradient "
        "clipping, a GradScaler under fp16, or a smaller eps.",
    ),
    _rule(
        name="loss_divergence",
        metric="loss_spike",
        op=">",
        threshold=2.0,
        warmup_steps=100,
        for_steps=60,
        severity="critical",
        summary="the loss has stayed over twice its running median for 60 steps: training is"
        " diverging",
        runbook="Lower the learning rate (or lengthen warm-up), clip gradients, and check the"
        " data of the steps where it started; resume from the last good checkpoint.",
    ),
    _rule(
        name="amp_skips_persist",
        metric="amp_skip_fraction",
        op=">",
        threshold=0.5,
        for_steps=50,
        severity="critical",
        summary="the GradScaler skipped most steps for 50 steps: gradients keep overflowing",
        runbook="The loss scale keeps falling: look for a layer producing Inf/NaN (bf16 or "
        "float32 there), a too high learning rate, or a bad batch.",
    ),
    _rule(
        name="exploding_gradients",
        metric="grad_norm_spike",
        op=">",
        threshold=100,
        severity="critical",
        summary="the total gradient norm is non-finite or over 100x its running median",
        runbook="Clip gradients, lower the learning rate, look for a bad batch.",
    ),
    _rule(
        name="vanishing_gradients",
        metric="grad_norm_depth_ratio",
        op="<",
        threshold=1e-4,
        for_steps=100,
        severity="warning",
        summary="the first layer's gradient is 10,000x smaller than the last layer's",
        runbook="Use residual connections, normalisation, or non-saturating activations.",
    ),
    _rule(
        name="update_ratio_high",
        metric="update_ratio",
        op=">",
        threshold=0.1,
        for_steps=50,
        severity="warning",
        summary="each step changes this layer's weights by over 10%",
        runbook="The learning rate is too high for this layer.",
    ),
    _rule(
        name="update_ratio_low",
        metric="update_ratio",
        op="<",
        threshold=1e-6,
        for_steps=200,
        severity="info",
        summary="this layer's weights barely change (under 1e-6 per step)",
        runbook="The learning rate is too low for this layer, or it is effectively frozen.",
    ),
]
