"""Prometheus sink: a private registry whose collector builds metric families from the latest
Snapshot at each scrape, served on 127.0.0.1 or pushed to a Pushgateway.

Nothing is registered globally: two monitors in one process each have their own registry
and endpoint. Label cardinality is bounded by ``max_layer_series`` over the whole run, not only
per scrape: the layers that get their own series keep them (a series never moves in or out of
``_other``), so ``_other``'s counters only grow and Prometheus never reads a counter reset.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.registry import Collector

from actmon.config import PrometheusSinkConfig
from actmon.errors import ConfigError
from actmon.rules import Alert
from actmon.sinks.prom_histogram import BUCKET_BOUNDS, HistogramExport
from actmon.snapshot import LayerStats, NonFinite, Snapshot

log = logging.getLogger("actmon")

OTHER = "_other"

# Per-layer gauges: exported name -> (LayerStats metric, HELP text).
LAYER_GAUGES: dict[str, tuple[str, str]] = {
    "actmon_dead_fraction": (
        "dead_fraction",
        "Share of a ReLU-family layer's units that were "
        "exactly 0 on every element of every sampled batch of the window.",
    ),
    "actmon_dormant_fraction": (
        "dormant_fraction",
        "Share of a leaky/smooth-gated layer's units never > 0 in the window.",
    ),
    "actmon_zero_fraction": ("zero_fraction", "Share of a layer's output elements exactly 0."),
    "actmon_saturation_fraction": (
        "saturation_fraction",
        "Share of a sigmoid/tanh/clipping layer's outputs within saturation_eps of its bounds.",
    ),
    "actmon_activation_mean": ("mean", "Mean of a layer's outputs over the window."),
    "actmon_activation_std": ("std", "Standard deviation of a layer's outputs over the window."),
    "actmon_activation_abs_max": ("abs_max", "Largest |output| of a layer in the window."),
    "actmon_softmax_max_prob": (
        "softmax_max_prob",
        "Mean max-probability of a softmax layer's rows (near 1: collapsed to one-hot).",
    ),
    "actmon_softmax_entropy": ("softmax_entropy", "Mean entropy (nats) of a softmax layer's rows."),
    "actmon_grad_norm": (
        "grad_norm",
        "L2 norm of a layer's parameter gradients (RMS over the window's sampled steps).",
    ),
    "actmon_output_grad_norm": (
        "output_grad_norm",
        "L2 norm of the gradient of a layer's output (RMS over the window's sampled steps).",
    ),
    "actmon_update_ratio": (
        "update_ratio",
        "||delta w|| / ||w|| of a layer's parameters at the window's first sampled optimizer step.",
    ),
    "actmon_weight_norm": ("weight_norm", "L2 norm of a layer's parameters."),
    "actmon_nonfinite_units": (
        "nonfinite_units",
        "Units of a layer whose output maximum over the window was NaN (dead and dormant"
        " fractions are over the other units).",
    ),
    "actmon_layer_step": (
        "as_of_step",
        "Last step of the window a layer's figures describe (older than actmon_step when the"
        " layer did not run in the latest window and its figures were carried).",
    ),
}


def _worst(layer: LayerStats) -> float:
    """Health score used to choose which layers keep their own series: worse is larger."""
    return layer.health_score()


class _SnapshotCollector(Collector):
    def __init__(self, sink: PrometheusSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        return iter(self.sink.families())


class PrometheusSink:
    """Exposes the latest window; counters accumulate over the run.

    ``rank`` (per-rank export under torch.distributed) adds a ``rank`` label to every series
    and to the Pushgateway grouping key, so ranks never overwrite each other's values.
    """

    def __init__(self, config: PrometheusSinkConfig, run: str, rank: int | None = None) -> None:
        self.config = config
        self.run = run
        self.rank = rank
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(self))
        self._lock = threading.Lock()
        self._latest: Snapshot | None = None
        self._nonfinite: dict[tuple[str, str, str, str], float] = {}  # (layer, kind, tensor, value)
        self._kinds: dict[str, str] = {}
        self._alerts_total: dict[tuple[str, str], float] = {}  # (rule, severity) -> firings
        self._alert_active: dict[tuple[str, str, str], float] = {}  # (rule, layer, severity)
        self._first_nonfinite: NonFinite | None = None  # the run's, completed when confirmed
        # Layers with their own series, kept for the run (insertion order). While every layer
        # fits under max_layer_series each gets one; from the first window with more, the
        # worst of that window's new layers fill what is left of max_layer_series - 1 and every
        # later layer goes to _other.
        self._own: dict[str, None] = {}
        self._overflow = False
        self._histograms = HistogramExport(config.histogram_layers, config.max_histogram_layers)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        if config.mode == "endpoint":
            self._serve()

    # ---- endpoint --------------------------------------------------------------------------
    def _start(self, port: int) -> tuple[WSGIServer, threading.Thread]:
        c = self.config
        tls: dict[str, object] = {}
        if c.tls_cert_file is not None:
            tls = {"certfile": c.tls_cert_file, "keyfile": c.tls_key_file}
            if c.tls_client_ca_file is not None:
                tls.update(client_cafile=c.tls_client_ca_file, client_auth_required=True)
        return start_http_server(port, addr=c.host, registry=self.registry, **tls)  # type: ignore[arg-type]

    def _serve(self) -> None:
        host, port = self.config.host, self.config.port
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "actmon: the metrics endpoint binds %s: it is reachable from other"
                " machines (the default is 127.0.0.1)",
                host,
            )
        try:
            self._server, self._thread = self._start(port)
        except OSError as exc:
            if self.config.port_in_use == "error":
                raise ConfigError(
                    f"config field 'sinks.prometheus.port': {host}:{port} is not available"
                    f" ({exc}); choose another port, 0 for a free one, or set port_in_use to"
                    " 'fallback' or 'disable'"
                ) from None
            if self.config.port_in_use == "disable":
                log.warning(
                    "actmon: Prometheus port %s:%d is not available (%s); the"
                    " Prometheus sink is off",
                    host,
                    port,
                    exc,
                )
                return
            self._server, self._thread = self._start(0)
            log.warning(
                "actmon: Prometheus port %s:%d is not available (%s); serving on %d",
                host,
                port,
                exc,
                self._server.server_port,
            )
        scheme = "https" if self.config.tls_cert_file else "http"
        self.url = f"{scheme}://{_url_host(host)}:{self._server.server_port}/metrics"

    # ---- Sink protocol -----------------------------------------------------------------------
    def write(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._latest = snapshot
            self._assign_series(snapshot)
            first = snapshot.first_nonfinite
            if first is not None and (
                self._first_nonfinite is None
                or (self._first_nonfinite.layer is None and first.layer is not None)
            ):
                self._first_nonfinite = first
            for tensor, steps in (
                ("loss", snapshot.nonfinite_loss_steps),
                ("grad_norm", snapshot.nonfinite_grad_norm_steps),
            ):  # run-level: steps whose loss / total gradient norm was NaN or Inf
                key = ("", "", tensor, "nonfinite")
                self._nonfinite[key] = self._nonfinite.get(key, 0.0) + steps
            self._histograms.add(list(snapshot.fresh_layers().values()))
            for layer in snapshot.fresh_layers().values():  # carried figures count once
                self._kinds[layer.name] = layer.kind.value
                for tensor, value, count in (
                    ("activation", "nan", layer.nan_count),
                    ("activation", "inf", layer.posinf_count + layer.neginf_count),
                    ("gradient", "nan", layer.output_grad_nan_count),
                    ("gradient", "inf", layer.output_grad_inf_count),
                ):
                    key = (layer.name, layer.kind.value, tensor, value)
                    self._nonfinite[key] = self._nonfinite.get(key, 0.0) + count
        if self.config.mode == "pushgateway":
            self.push()

    def write_alert(self, alert: Alert) -> None:
        key = (alert.rule, alert.layer or "", alert.severity)
        with self._lock:
            if alert.state == "firing":
                total = (alert.rule, alert.severity)
                self._alerts_total[total] = self._alerts_total.get(total, 0.0) + 1
            self._alert_active[key] = 1.0 if alert.state == "firing" else 0.0

    def push(self) -> None:
        c = self.config
        handler = default_handler
        if c.pushgateway_username is not None:
            user = c.pushgateway_username
            password = os.environ.get(c.pushgateway_password_env, "")

            def handler(url, method, timeout, headers, data):  # type: ignore[no-untyped-def]
                return basic_auth_handler(url, method, timeout, headers, data, user, password)

        push_to_gateway(
            c.pushgateway_url,
            job=c.job,
            registry=self.registry,
            grouping_key={"run": self.run}
            if self.rank is None
            else {"run": self.run, "rank": str(self.rank)},
            timeout=5.0,
            handler=handler,
        )

    def close(self) -> None:
        if self.config.mode == "pushgateway" and self._latest is not None:
            self.push()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5.0)
            self._server = None

    # ---- exposition --------------------------------------------------------------------------
    def _assign_series(self, snapshot: Snapshot) -> None:
        """Give the window's new layers their own series or ``_other``, for the run (under the
        lock). A layer that has a series keeps it; one in ``_other`` stays there."""
        new = [layer for name, layer in snapshot.layers.items() if name not in self._own]
        if self._overflow or not new:
            return
        limit = self.config.max_layer_series
        if len(self._own) + len(new) <= limit:
            self._own.update(dict.fromkeys(layer.name for layer in new))
            return
        self._overflow = True
        free = max(limit - 1 - len(self._own), 0)  # one label value is _other's
        for layer in sorted(new, key=_worst, reverse=True)[:free]:
            self._own[layer.name] = None
        log.warning(
            "actmon: %d layers exceed max_layer_series=%d; %d keep their own series for the"
            " run (the worst at step %d) and every other layer, now or later, is exported as"
            ' layer="%s"',
            len(snapshot.layers),
            limit,
            len(self._own),
            snapshot.step,
            OTHER,
        )

    def families(self) -> list[Metric]:
        """Metric families for the latest window (called at each scrape / push)."""
        with self._lock:
            snap = self._latest
            nonfinite = dict(self._nonfinite)
            alerts_total = dict(self._alerts_total)
            alert_active = dict(self._alert_active)
            histograms = [
                (name, kind, self._histograms.buckets[name].copy())
                for name, kind in self._histograms.layers.items()
            ]
            owned = set(self._own)
            overflow = self._overflow
        if snap is None:
            return []
        run = bounded(self.run)
        labels = ["run", "layer", "kind"]
        out: list[Metric] = []
        own = [layer for name, layer in snap.layers.items() if name in owned]
        rest = [layer for name, layer in snap.layers.items() if name not in owned]
        rows = [
            (bounded(ls.name), ls.kind.value, {**ls.metrics(), "as_of_step": ls.as_of_step})
            for ls in own
        ]
        if rest:
            rows.append((OTHER, "mixed", _mean_metrics([layer.metrics() for layer in rest])))
        for name, (metric, help_text) in LAYER_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for layer, kind, values in rows:
                if metric in values:
                    family.add_metric([run, layer, kind], values[metric])
            out.append(family)
        quantiles = GaugeMetricFamily(
            "actmon_activation_quantile",
            "Quantile of a layer's outputs over the window, read"
            " from its histogram (exact to within one bin).",
            labels=[*labels, "quantile"],
        )
        for layer, kind, values in rows:
            for key, value in values.items():
                if key.startswith("quantile_"):
                    quantiles.add_metric([run, layer, kind, key.removeprefix("quantile_")], value)
        out.append(quantiles)
        nf = CounterMetricFamily(
            "actmon_nonfinite",
            "NaN and Inf values seen in a layer's outputs (activation) or"
            ' output gradients (gradient), over the run\'s sampled steps; with layer="",'
            ' steps whose loss (tensor="loss") or total gradient norm (tensor="grad_norm")'
            " was NaN or Inf, over every step.",
            labels=[*labels, "tensor", "value"],
        )
        info = GaugeMetricFamily(
            "actmon_layer_info",
            "1 for every exported layer; hidden is false for the model's last layer in forward"
            " order (its output), which rules on hidden layers leave out; depth is the layer's"
            " position in forward order, zero-padded so that sorting by it sorts by depth.",
            labels=[*labels, "hidden", "depth"],
        )
        depth = {name: i for i, name in enumerate(snap.layers)}
        for stats in own:
            info.add_metric(
                [
                    run,
                    bounded(stats.name),
                    stats.kind.value,
                    str(stats.hidden).lower(),
                    f"{depth[stats.name]:04d}",
                ],
                1.0,
            )
        if rest:
            info.add_metric([run, OTHER, "mixed", "true", ""], 1.0)
        out.append(info)
        # _other's counters sum layers that never leave it: they only grow.
        exported = owned | {""}  # "": the loss and gradient norm
        other: dict[tuple[str, str], float] = {}
        for (layer, kind, tensor, which), count in sorted(nonfinite.items()):
            if layer in exported or not overflow:
                nf.add_metric([run, bounded(layer), kind, tensor, which], count)
            else:
                other[(tensor, which)] = other.get((tensor, which), 0.0) + count
        for (tensor, which), count in sorted(other.items()):
            nf.add_metric([run, OTHER, "mixed", tensor, which], count)

        out.append(nf)
        if histograms:
            out.append(_histogram_family(run, histograms))
        out.extend(self._run_families(snap))
        first = self._first_nonfinite
        if first is not None:
            family = GaugeMetricFamily(
                "actmon_first_nonfinite_step",
                "Step of the run's first NaN/Inf value; layer is the first offending layer in"
                " forward order once a sampled step has named it (empty before).",
                labels=["run", "layer", "source"],
            )
            family.add_metric([run, bounded(first.layer or ""), first.source], first.step)
            out.append(family)
        fired = CounterMetricFamily(
            "actmon_alerts",
            "Alerts fired, by rule and severity.",
            labels=["run", "rule", "severity"],
        )
        for (rule, severity), count in sorted(alerts_total.items()):
            fired.add_metric([run, bounded(rule), severity], count)
        active = GaugeMetricFamily(
            "actmon_alert_active",
            "1 while an alert holds, 0 once resolved.",
            labels=["run", "rule", "layer", "severity"],
        )
        # Alerts of layers without their own series: one _other series per rule, 1 while any holds.
        rows_active: dict[tuple[str, str, str], float] = {}
        for (rule, layer, severity), value in alert_active.items():
            where = OTHER if overflow and layer and layer not in owned else layer
            row = (rule, where, severity)
            rows_active[row] = max(value, rows_active.get(row, 0.0))
        for (rule, layer, severity), value in sorted(rows_active.items()):
            active.add_metric([run, bounded(rule), bounded(layer), severity], value)
        out.extend([fired, active])
        if self.rank is not None:  # every series of a per-rank export carries its rank
            _add_label(out, "rank", str(self.rank))
        return out

    def _run_families(self, snap: Snapshot) -> list[Metric]:
        run = bounded(self.run)
        step = GaugeMetricFamily(
            "actmon_step", "Last training step of the latest window.", labels=["run"]
        )
        step.add_metric([run], snap.step)
        out: list[Metric] = [step]
        for name, value, help_text in (
            ("actmon_loss", snap.loss, "Mean loss over the latest window's steps."),
            (
                "actmon_grad_norm_total",
                snap.grad_norm_total,
                "Total parameter-gradient L2 norm (RMS over the window's steps).",
            ),
            (
                "actmon_amp_skipped_steps",
                snap.amp_skipped_steps,
                "Steps of the latest window that the GradScaler skipped (overflowed gradients).",
            ),
            (
                "actmon_amp_skip_fraction",
                snap.amp_skip_fraction,
                "Share of the latest window's steps that the GradScaler skipped.",
            ),
            (
                "actmon_loss_scale",
                snap.loss_scale,
                "The GradScaler's loss scale at the end of the latest window (halved at each"
                " overflow, grown after a run of clean steps).",
            ),
            (
                "actmon_grad_norm_depth_ratio",
                snap.grad_norm_depth_ratio,
                "First parameterised layer's gradient norm over the last one's (forward order);"
                " vanishing gradients read as a tiny ratio.",
            ),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["run"])
            if value is not None and not math.isnan(value):
                family.add_metric([run], value)
            out.append(family)
        overhead = CounterMetricFamily(
            "actmon_overhead_seconds",
            "Host time spent by actmon in hooks and flushes.",
            labels=["run"],
        )
        overhead.add_metric([run], snap.overhead_seconds_total)
        errors = CounterMetricFamily(
            "actmon_internal_errors",
            "Failures contained inside actmon (a hook, a flush or a sink), by where they happened.",
            labels=["run", "sink", "layer"],
        )
        # Drops ("dropped:<sink>") have their own counter, actmon_dropped_windows_total.
        contained = {k: v for k, v in snap.internal_errors.items() if not k.startswith("dropped:")}
        if not contained:  # a zero series, so dashboards and rate() see the counter
            errors.add_metric([run, "", ""], 0.0)
        for where, count in sorted(contained.items()):
            sink = where.removeprefix("sink:") if where.startswith("sink:") else ""
            errors.add_metric([run, bounded(sink), "" if sink else bounded(where)], count)
        dropped = CounterMetricFamily(
            "actmon_dropped_windows",
            "Windows a sink dropped (its queue full, still failing after its retries, or left at"
            " the drain deadline), by sink; a run with drops is incomplete in the run store.",
            labels=["run", "sink"],
        )
        for sink, count in sorted(snap.dropped_windows.items()):
            dropped.add_metric([run, bounded(sink)], count)
        out.extend([overhead, errors, dropped])
        return out


MAX_LABEL = 200  # characters of a label value; longer names are cut and tagged with a hash


def bounded(value: str) -> str:
    """A label value of bounded length (the store keeps the full name)."""
    if len(value) <= MAX_LABEL:
        return value
    digest = hashlib.sha1(value.encode()).hexdigest()[:8]
    return f"{value[: MAX_LABEL - 10]}…{digest}"


def _histogram_family(run: str, layers: list[tuple[str, str, np.ndarray]]) -> HistogramMetricFamily:
    """``actmon_activation`` histograms (fixed buckets, counters over the run) per layer."""
    family = HistogramMetricFamily(
        "actmon_activation",
        "A layer's output values over the run's sampled steps, in fixed log-spaced buckets"
        " (+-4**k, k in -6..6; exact to within one bin of the layer's histogram).",
        labels=["run", "layer", "kind"],
    )
    bounds = [repr(b) for b in BUCKET_BOUNDS] + ["+Inf"]  # exact: powers of two
    for name, kind, buckets in layers:
        family.add_metric(
            [run, bounded(name), kind],
            buckets=list(zip(bounds, [float(v) for v in buckets], strict=True)),
            sum_value=None,  # negative buckets: no _sum (see prom_histogram)
        )
    return family


def _add_label(families: list[Metric], name: str, value: str) -> None:
    for family in families:
        family.samples = [s._replace(labels={**s.labels, name: value}) for s in family.samples]


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for row in rows for k in row}
    out = {}
    for key in keys:
        values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and examples)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
