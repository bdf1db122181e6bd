"""Snapshots: one window of statistics as plain Python/numpy data, and how they are derived.

A :class:`Snapshot` is what rules and sinks consume. It holds no torch tensors, so it can be
pickled, logged or sent across threads freely. :func:`build_snapshot` turns the aggregator's
raw window (:class:`~actmon.aggregate.WindowData`) into the metrics users read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from actmon import histogram, stats
from actmon.aggregate import WindowData
from actmon.kinds import BOUNDED_KINDS, DORMANT_KINDS, SATURATING_KINDS, Kind

if TYPE_CHECKING:  # config imports rules, which import this module
    from actmon.config import Config


@dataclass(frozen=True)
class LayerInfo:
    """A monitored layer: its name in ``named_modules()``, kind, unit axis and number of units.

    ``unit_axis`` and ``units`` are known once the layer has run (or from the module for
    Linear/Conv/norm layers); they are None before that.
    """

    name: str
    kind: Kind
    unit_axis: int | None
    units: int | None
    params: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None


# Per-layer scalar metrics, by LayerStats field name: the names sinks, the store and rules use.
LAYER_METRICS = (
    "count",
    "calls",
    "mean",
    "std",
    "min",
    "max",
    "zero_fraction",
    "nan_count",
    "posinf_count",
    "neginf_count",
    "dead_fraction",
    "dead_fraction_batch",
    "dormant_fraction",
    "nonfinite_units",
    "saturation_fraction",
    "softmax_max_prob",
    "softmax_entropy",
    "output_grad_norm",
    "output_grad_abs_max",
    "output_grad_nan_count",
    "output_grad_inf_count",
    "grad_norm",
    "weight_norm",
    "update_ratio",
)
RUN_METRICS = (
    "loss",
    "loss_last",
    "grad_norm_total",
    "grad_norm_total_max",
    "nonfinite_count",
    "amp_skipped_steps",
    "amp_skip_fraction",
    "loss_scale",
    "grad_norm_depth_ratio",
)


def health_score(nonfinite_count: float, fractions: Sequence[float | None]) -> float:
    """How unhealthy a layer looks, larger is worse: any NaN/Inf first (2 and up), then its
    worst dead, dormant or saturated fraction (None and NaN fractions left out). One ordering
    for every consumer: sinks from a Snapshot, the report from the run store."""
    worst = max((v for v in fractions if v is not None and not math.isnan(v)), default=0.0)
    return (2.0 if nonfinite_count else 0.0) + worst


@dataclass(frozen=True)
class LayerStats:
    """One layer's statistics over one window (None where a metric does not apply)."""

    name: str
    kind: Kind
    calls: int  # forward calls summarised in the window (a shared module counts each call)
    sampled_steps: int  # sampled steps in which the layer ran
    count: int  # elements summarised
    mean: float
    std: float  # population standard deviation
    min: float
    max: float
    zero_fraction: float
    nan_count: int
    posinf_count: int
    neginf_count: int
    units: int | None
    dead_units: int | None  # ReLU family: never > 0 in any sampled batch of the window
    # Dead and dormant fractions are over the units whose outputs were finite: a unit that
    # output NaN is neither dead nor alive (NaN when every unit did; see nonfinite_units).
    dead_fraction: float | None
    dead_fraction_batch: float | None  # mean over sampled batches of the per-batch dead share
    dormant_fraction: float | None  # leaky / smooth-gated: never > 0 in the window
    saturation_fraction: float | None  # sigmoid / tanh / clipping kinds
    softmax_max_prob: float | None
    softmax_entropy: float | None
    quantiles: dict[float, float]
    hist_edges: np.ndarray = field(repr=False)
    hist_counts: np.ndarray = field(repr=False)
    output_grad_norm: float | None = None  # RMS over sampled steps of the per-step L2 norm
    output_grad_abs_max: float | None = None
    output_grad_nan_count: int = 0
    output_grad_inf_count: int = 0
    # Output-gradient histogram (symmetric-log edges) when ``gradients.histogram`` is on.
    output_grad_hist_edges: np.ndarray | None = field(default=None, repr=False)
    output_grad_hist_counts: np.ndarray | None = field(default=None, repr=False)
    grad_norm: float | None = None  # parameter gradient L2 norm of the layer (RMS over steps)
    weight_norm: float | None = None
    update_ratio: float | None = None  # ||delta w|| / ||w||
    # Units whose maximum over the window was NaN (dead/dormant fractions leave them out).
    nonfinite_units: int | None = None
    # The last step of the window these figures describe. It is the Snapshot's own step,
    # except for a layer that did not run in this window: the Snapshot then carries its
    # latest figures forward (so every layer seen so far is listed and exported) and rules
    # do not count them again. See :attr:`stale`.
    as_of_step: int = 0
    hidden: bool = True  # False for the model's last layer in forward order (its output)

    def stale(self, snapshot_step: int) -> bool:
        """Whether these figures were carried from an earlier window (the layer did not run)."""
        return self.as_of_step != snapshot_step

    def metrics(self) -> dict[str, float]:
        """Every numeric metric that applies to this layer, by its exported name.

        Computed once and cached: rules and every sink read it (do not mutate the result).
        """
        cached = self.__dict__.get("_metrics")
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        out = {name: float(v) for name in LAYER_METRICS if (v := getattr(self, name)) is not None}
        out["abs_max"] = max(abs(self.min), abs(self.max))
        for q, value in self.quantiles.items():
            out[f"quantile_{q:g}"] = value
        self.__dict__["_metrics"] = out  # frozen dataclass: cache beside the fields
        return out

    def health_score(self) -> float:
        """How unhealthy the layer looks (see :func:`health_score`). Sinks rank layers by it
        (console, the layers that keep their own Prometheus series)."""
        fractions = (self.dead_fraction, self.dormant_fraction, self.saturation_fraction)
        return health_score(self.nonfinite_count, fractions)

    @property
    def nonfinite_count(self) -> int:
        return (
            self.nan_count
            + self.posinf_count
            + self.neginf_count
            + self.output_grad_nan_count
            + self.output_grad_inf_count
        )


@dataclass(frozen=True)
class ParamStats:
    """One parameter's norms over one window (RMS over the sampled steps)."""

    name: str
    layer: str | None
    grad_norm: float | None
    weight_norm: float | None
    update_ratio: float | None


@dataclass(frozen=True)
class NonFinite:
    """Where non-finite values first showed up: the step, and the layer when it was sampled."""

    step: int  # the step of the first non-finite value
    source: str  # "activation", "gradient", "loss" or "grad_norm"
    layer: str | None = None  # the first offending layer in forward order, once known
    # The step whose sampled statistics named ``layer``: ``step`` itself when that step was
    # sampled, later when the value showed first in the loss or gradient norm of an unsampled
    # step and sampling every step found the layer (``escalate_on_nonfinite``).
    confirmed_step: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """One window: run-level values plus :class:`LayerStats` per layer that ran."""

    run: str
    step: int  # the last step of the window
    window: tuple[int, int]  # first and last step
    sampled_steps: tuple[int, ...]
    loss: float | None  # mean over the window's steps that reported a loss
    loss_last: float | None
    losses: tuple[float, ...]  # per step (NaN where no loss was given)
    grad_norm_total: float | None  # RMS over the window's steps of the total gradient norm
    grad_norm_total_max: float | None
    grad_norms_total: tuple[float, ...]  # per step
    first_nonfinite: NonFinite | None
    layers: dict[str, LayerStats]
    params: dict[str, ParamStats]
    overhead_seconds_total: float = 0.0  # the monitor's own host time so far
    internal_errors: dict[str, int] = field(default_factory=dict)  # so far, by where
    dropped_windows: dict[str, int] = field(default_factory=dict)  # so far, by sink
    # The rank whose own view this is (distributed: per_rank); None for a single process and
    # for windows reduced over every rank.
    rank: int | None = None
    # With a GradScaler: the window's steps it skipped (overflowed gradients), and their share.
    amp_skipped_steps: int | None = None
    amp_skip_fraction: float | None = None
    # The GradScaler's loss scale at the window's end (read after the window's copy to the host).
    loss_scale: float | None = None
    # First parameterised layer's gradient norm over the last one's (forward order), from the
    # layers measured in this window; vanishing gradients read as a tiny ratio.
    grad_norm_depth_ratio: float | None = None
    # Steps of the window whose loss / total gradient norm was NaN or +-Inf (sentinel values).
    nonfinite_loss_steps: int = 0
    nonfinite_grad_norm_steps: int = 0

    def fresh_layers(self) -> dict[str, LayerStats]:
        """The layers measured in this window (without figures carried from earlier ones)."""
        return {n: s for n, s in self.layers.items() if not s.stale(self.step)}

    @property
    def nonfinite_count(self) -> int:
        """NaN/Inf values seen in the window's activations and output gradients."""
        return sum(layer.nonfinite_count for layer in self.fresh_layers().values())

    def run_metrics(self) -> dict[str, float]:
        """Run-level metrics of the window that have a value, and ``sampled_steps``: how many of
        its steps the layer figures cover."""
        out = {name: float(v) for name in RUN_METRICS if (v := getattr(self, name)) is not None}
        out["sampled_steps"] = float(len(self.sampled_steps))
        return out


def build_snapshot(
    data: WindowData,
    run: str,
    layers: list[LayerInfo],
    params: list[tuple[str, int | None]],
    config: Config,
    unit_offsets: dict[int, tuple[int, int]],
    order: Sequence[int] | None = None,
) -> Snapshot:
    """Derive every metric of a window from the raw counts (host only, numpy).

    ``layers`` is indexed like the data; ``order`` is the display order of the Snapshot's layers.
    """
    layer_stats: dict[str, LayerStats] = {}
    indices = list(order if order is not None else range(len(layers)))
    output_layer = indices[-1] if indices else None
    for i in indices:
        info = layers[i]
        if data.host.calls[i] == 0:
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: NaN std, as torch
            stats_i = _layer_stats(i, info, data, config, unit_offsets.get(i))
        layer_stats[info.name] = replace(stats_i, hidden=i != output_layer)
    _add_param_norms(layer_stats, layers, params, data)
    losses, totals = data.sentinel[:, 0], data.sentinel[:, 1]
    loss_given = _flags(data.host.loss_given, len(losses))
    grad_given = _flags(data.host.grad_given, len(totals))
    loss_values, seen_totals = losses[loss_given], totals[grad_given]
    return Snapshot(
        run=run,
        step=data.last_step,
        window=(data.first_step, data.last_step),
        sampled_steps=tuple(data.sampled_steps),
        loss=float(np.mean(loss_values)) if loss_values.size else None,
        loss_last=float(loss_values[-1]) if loss_values.size else None,
        losses=tuple(float(v) if g else math.nan for v, g in zip(losses, loss_given, strict=True)),
        grad_norm_total=float(np.sqrt(np.mean(np.square(seen_totals))))
        if seen_totals.size
        else None,
        grad_norm_total_max=float(np.max(seen_totals)) if seen_totals.size else None,
        grad_norms_total=tuple(
            float(v) if g else math.nan for v, g in zip(totals, grad_given, strict=True)
        ),
        first_nonfinite=_first_nonfinite(data, layers, loss_given, grad_given),
        layers=layer_stats,
        params=_param_stats(layers, params, data),
        amp_skipped_steps=sum(data.host.amp_skipped) if data.host.amp_skipped else None,
        amp_skip_fraction=sum(data.host.amp_skipped) / len(data.host.amp_skipped)
        if data.host.amp_skipped
        else None,
        grad_norm_depth_ratio=_depth_ratio(layer_stats),
        nonfinite_loss_steps=int(np.count_nonzero(~np.isfinite(loss_values))),
        nonfinite_grad_norm_steps=int(np.count_nonzero(~np.isfinite(seen_totals))),
    )


def _depth_ratio(layer_stats: dict[str, LayerStats]) -> float | None:
    """First over last parameter-gradient norm in forward order (None below two layers, or
    when the last is 0; NaN when either is NaN)."""
    norms = [g for s in layer_stats.values() if (g := s.grad_norm) is not None]
    if len(norms) < 2 or norms[-1] == 0:
        return None
    return norms[0] / norms[-1]


def _flags(flags: list[bool], n: int) -> np.ndarray:
    """Which of the window's n steps reported a value (steps without one hold NaN)."""
    return np.array((flags + [False] * n)[:n], dtype=bool)


def _variance(count: int, mean: float, sumsq: float, vmin: float, vmax: float) -> float:
    """The window's population variance from its sums (each call's sums are built around a
    value of that call, so what cancels here is float64, not float32), clamped into
    [0, ((max - min) / 2) ** 2] (Popoviciu's bound): exactly 0 for a constant output.

    NaN with no elements or a NaN/Inf among them (as torch.std); inf when the sum of squares
    overflowed (float32 on a GPU, a spread beyond ~1.8e19 / sqrt(n)).
    """
    if not count or not (math.isfinite(vmin) and math.isfinite(vmax)):
        return math.nan
    if vmin == vmax:
        return 0.0
    if math.isinf(sumsq):
        return math.inf
    variance = sumsq / count - mean * mean
    if math.isnan(variance):
        return math.nan
    return min(max(variance, 0.0), ((vmax - vmin) / 2) ** 2)


def _layer_stats(
    i: int, info: LayerInfo, data: WindowData, config: Config, units_slice: tuple[int, int] | None
) -> LayerStats:
    host = data.host
    count = int(host.count[i])
    total, sumsq, max_prob_sum, entropy_sum = data.act_sum[i]
    vmax, neg_min = data.act_max[i]
    vmin = -neg_min
    nonzero, saturated = data.act_count[i]
    raw = data.act_hist[i]
    nan = int(raw[list(stats.NAN_BINS)].sum())
    pinf, ninf = int(raw[stats.POS_INF_BIN]), int(raw[stats.NEG_INF_BIN])
    # count 0: every call of the window had an empty batch; the layer is listed with NaN
    # figures (no data: rules neither fire nor resolve on them) and zero counts.
    mean = total / count if count else math.nan
    if not count:
        vmin = vmax = math.nan
    variance = _variance(count, float(mean), float(sumsq), float(vmin), float(vmax))
    kind = info.kind
    if kind in BOUNDED_KINDS and info.bounds is not None:
        counts = data.lin_hist[i][:-1].copy()
        counts[-1] -= pinf  # +-Inf were clamped into the edge bins on the device; take them out
        counts[0] -= ninf
        edges = histogram.linear_edges(info.bounds[0], info.bounds[1], config.histogram.linear_bins)
        qs = histogram.quantiles(edges, counts, config.quantiles, vmin, vmax)
    else:
        hc = config.histogram
        edges, counts = histogram.symlog_view(raw, hc.min_exp, hc.max_exp, hc.bins_per_octave)
        qs = histogram.quantiles(
            histogram.full_edges(),
            histogram.full_counts(raw),
            config.quantiles,
            vmin,
            vmax,
            zero_bins=True,
        )
    dead_units = dead_fraction = dead_batch = dormant = None
    units = info.units
    nonfinite_units = None
    if units_slice is not None and host.steps_with_data[i] > 0:
        offset, units = units_slice
        unit_max = data.unit_max[offset : offset + units]
        never_active = int(np.count_nonzero(unit_max <= 0))
        nonfinite_units = int(np.count_nonzero(np.isnan(unit_max)))
        finite = units - nonfinite_units
        share = never_active / finite if finite else math.nan  # NaN units: neither dead nor alive
        batch = float(data.batch_dead[i]) / (units * host.steps_with_data[i])
        if kind in DORMANT_KINDS:
            dormant = share
        else:
            dead_units, dead_fraction, dead_batch = never_active, share, batch
    rows = int(host.softmax_rows[i])
    grad_steps = int(host.grad_steps[i])
    grad_edges = grad_counts = None
    if config.gradients.histogram and grad_steps:
        hc = config.histogram
        grad_edges, grad_counts = histogram.symlog_view(
            data.grad_hist[i], hc.min_exp, hc.max_exp, hc.bins_per_octave
        )
    grad_sumsq, grad_nonfinite, grad_nan = data.grad_sum[i]
    return LayerStats(
        name=info.name,
        kind=kind,
        calls=int(host.calls[i]),
        sampled_steps=int(host.steps_with_data[i]),
        count=count,
        mean=float(mean),
        std=math.sqrt(variance) if not math.isnan(variance) else math.nan,
        min=float(vmin),
        max=float(vmax),
        zero_fraction=(count - int(nonzero)) / count if count else math.nan,
        nan_count=nan,
        posinf_count=pinf,
        neginf_count=ninf,
        units=units,
        dead_units=dead_units,
        dead_fraction=dead_fraction,
        dead_fraction_batch=dead_batch,
        dormant_fraction=dormant,
        saturation_fraction=(float(saturated) / count if count else math.nan)
        if kind in SATURATING_KINDS
        else None,
        softmax_max_prob=float(max_prob_sum) / rows if kind is Kind.SOFTMAX and rows else None,
        softmax_entropy=float(entropy_sum) / rows if kind is Kind.SOFTMAX and rows else None,
        quantiles=qs,
        hist_edges=edges,
        hist_counts=counts,
        output_grad_norm=float(np.sqrt(grad_sumsq / grad_steps)) if grad_steps else None,
        output_grad_abs_max=float(max(data.grad_max[i, 0], data.grad_max[i, 1]))
        if grad_steps
        else None,
        output_grad_nan_count=int(grad_nan),
        output_grad_inf_count=int(grad_nonfinite - grad_nan),
        output_grad_hist_edges=grad_edges,
        output_grad_hist_counts=grad_counts,
        nonfinite_units=nonfinite_units,
        as_of_step=data.last_step,
    )


def _param_stats(
    layers: list[LayerInfo], params: list[tuple[str, int | None]], data: WindowData
) -> dict[str, ParamStats]:
    out: dict[str, ParamStats] = {}
    host = data.host
    for p, (name, layer) in enumerate(params):
        steps, updates = int(host.param_steps[p]), int(host.update_steps[p])
        if steps == 0:
            continue
        grad_sq, weight_sq, update_sq = data.param_sq[p]
        weight = math.sqrt(weight_sq / steps)
        out[name] = ParamStats(
            name=name,
            layer=layers[layer].name if layer is not None else None,
            grad_norm=math.sqrt(grad_sq / steps),
            weight_norm=weight,
            update_ratio=_ratio(math.sqrt(update_sq / updates), weight) if updates else None,
        )
    return out


def _add_param_norms(
    layer_stats: dict[str, LayerStats],
    layers: list[LayerInfo],
    params: list[tuple[str, int | None]],
    data: WindowData,
) -> None:
    """Per-layer parameter norms: squares of the layer's parameters add up, then RMS over steps."""
    host = data.host
    per_layer: dict[int, list[int]] = {}
    for p, (_, layer) in enumerate(params):
        if layer is not None and host.param_steps[p] > 0:
            per_layer.setdefault(layer, []).append(p)
    for layer, members in per_layer.items():
        name = layers[layer].name
        if name not in layer_stats:
            continue
        steps = max(int(host.param_steps[p]) for p in members)
        grad_sq, weight_sq, update_sq = data.param_sq[members].sum(axis=0)
        updates = max(int(host.update_steps[p]) for p in members)
        weight = math.sqrt(weight_sq / steps)
        layer_stats[name] = replace(
            layer_stats[name],
            grad_norm=math.sqrt(grad_sq / steps),
            weight_norm=weight,
            update_ratio=_ratio(math.sqrt(update_sq / updates), weight) if updates else None,
        )


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when either is NaN (a NaN weight has no update ratio,
    least of all 0), Inf for a change of an all-zero weight."""
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator if denominator > 0 else math.inf if numerator > 0 else 0.0


def _first_nonfinite(
    data: WindowData, layers: list[LayerInfo], loss_given: np.ndarray, grad_given: np.ndarray
) -> NonFinite | None:
    """The earliest non-finite event in the window: a sampled layer output, else the sentinel."""
    first: NonFinite | None = None
    for step, call_layers, counts in data.call_nonfinite:
        hits = np.nonzero(counts > 0)[0]
        if hits.size:
            first = NonFinite(step, "activation", layers[call_layers[int(hits[0])]].name, step)
            break
    for position in range(data.sentinel.shape[0]):
        step = data.first_step + position
        if first is not None and step >= first.step:
            break
        loss, total = data.sentinel[position]
        if loss_given[position] and not math.isfinite(loss):
            return NonFinite(step, "loss")
        if grad_given[position] and not math.isfinite(total):
            return NonFinite(step, "grad_norm")
    return first
