"""TensorBoard sink: per-layer scalars, run scalars, pre-binned histograms, alert text.

Tags are laid out for TensorBoard's grouping, which puts the tags sharing a first path component
in one group: each metric has its own group with one card per layer, and the run-level values
have theirs.

* ``actmon.run/<name>`` — ``loss``, ``grad_norm_total``, ..., and ``alerts_active`` (the alerts
  firing once the window's rules ran); alert messages as text ``actmon.run/alerts``.
* ``actmon.<metric>/<layer>`` — e.g. ``actmon.dead_fraction/encoder.0.act``.
* ``actmon.hist/<layer>``, ``actmon.grad_hist/<layer>`` — activation and output-gradient
  histograms.

Histograms are written from the aggregator's own bins with ``add_histogram_raw``; nothing is
re-binned on the host. The writer uses its own event file, so it can share a log directory
with Lightning's TensorBoardLogger.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from actmon.rules import Alert
from actmon.snapshot import LayerStats, Snapshot

RUN_GROUP = "actmon.run"


def layer_tag(metric: str, layer: str) -> str:
    """The tag of one layer's metric: its group is the metric."""
    return f"actmon.{metric}/{layer}"


class TensorBoardSink:
    def __init__(self, log_dir: str | Path, histograms: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.histograms = histograms
        self._writer = SummaryWriter(
            log_dir=str(self.log_dir), flush_secs=10, filename_suffix=".actmon"
        )
        self._active: set[tuple[str, str | None]] = set()
        self._last_step: int | None = None  # the window whose alerts may still be arriving

    def write(self, snapshot: Snapshot) -> None:
        step = snapshot.step
        writer = self._writer
        # A window's alerts are delivered after it: the previous window's count is complete now.
        self._write_alert_count()
        self._last_step = step
        for name, value in snapshot.run_metrics().items():
            writer.add_scalar(f"{RUN_GROUP}/{name}", value, step)
        # Layers measured in this window; one that did not run keeps its points at the step of
        # the window that measured it (actmon.run/sampled_steps says how many steps each covers).
        for layer in snapshot.fresh_layers().values():
            for name, value in layer.metrics().items():
                writer.add_scalar(layer_tag(name, layer.name), value, step)
            if self.histograms:
                self._histogram(layer, step)

    def _histogram(self, layer: LayerStats, step: int) -> None:
        if math.isfinite(layer.min) and math.isfinite(layer.max):
            finite = layer.count - layer.nan_count - layer.posinf_count - layer.neginf_count
            self._raw(
                layer_tag("hist", layer.name),
                layer.hist_edges,
                layer.hist_counts,
                layer.mean * layer.count,
                (layer.std**2 + layer.mean**2) * layer.count,
                step,
                (layer.min, layer.max, finite),
            )
        if layer.output_grad_hist_counts is not None and layer.output_grad_hist_edges is not None:
            self._raw(
                layer_tag("grad_hist", layer.name),
                layer.output_grad_hist_edges,
                layer.output_grad_hist_counts,
                0.0,  # the gradient's sum is not kept; its sum of squares is
                (layer.output_grad_norm or 0.0) ** 2 * layer.sampled_steps,
                step,
            )

    def _raw(
        self,
        tag: str,
        edges_in: np.ndarray,
        counts_in: np.ndarray,
        total: float,
        sum_squares: float,
        step: int,
        exact: tuple[float, float, int] | None = None,
    ) -> None:
        """One pre-binned histogram. ``exact``: (min, max, number of finite values) when known;
        otherwise the outermost non-empty bucket edges and the counts' total."""
        counts = np.asarray(counts_in, dtype=np.float64)
        edges = np.asarray(edges_in, dtype=np.float64)
        used = np.nonzero(counts)[0]
        if used.size == 0:
            return
        lo, hi = used[0], used[-1] + 1  # trim empty buckets at both ends
        low, high, num = exact or (float(edges[lo]), float(edges[hi]), int(counts.sum()))
        self._writer.add_histogram_raw(
            tag,
            min=low,
            max=high,
            num=num,
            sum=total,
            sum_squares=sum_squares,
            bucket_limits=edges[lo + 1 : hi + 1].tolist(),
            bucket_counts=counts[lo:hi].tolist(),
            global_step=step,
        )

    def write_alert(self, alert: Alert) -> None:
        key = (alert.rule, alert.layer)
        if alert.state == "firing":
            if alert.layer is not None:  # a run-level alert re-issued naming its layer
                self._active.discard((alert.rule, None))
            self._active.add(key)
        else:
            self._active.discard(key)
        self._writer.add_text(f"{RUN_GROUP}/alerts", alert.message(), alert.step)

    def _write_alert_count(self) -> None:
        if self._last_step is not None:
            self._writer.add_scalar(
                f"{RUN_GROUP}/alerts_active", float(len(self._active)), self._last_step
            )
            self._last_step = None

    def close(self) -> None:
        self._write_alert_count()
        self._writer.flush()
        self._writer.close()
