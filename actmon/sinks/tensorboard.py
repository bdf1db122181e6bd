"""TensorBoard sink: scalars ``actmon/<metric>/<layer>``, run scalars, pre-binned histograms.

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


class TensorBoardSink:
    def __init__(self, log_dir: str | Path, histograms: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.histograms = histograms
        self._writer = SummaryWriter(
            log_dir=str(self.log_dir), flush_secs=10, filename_suffix=".actmon"
        )

    def write(self, snapshot: Snapshot) -> None:
        step = snapshot.step
        writer = self._writer
        for name, value in snapshot.run_metrics().items():
            writer.add_scalar(f"actmon/{name}", value, step)
        for layer in snapshot.layers.values():
            for name, value in layer.metrics().items():
                writer.add_scalar(f"actmon/{name}/{layer.name}", value, step)
            if self.histograms:
                self._histogram(layer, step)

    def _histogram(self, layer: LayerStats, step: int) -> None:
        counts = np.asarray(layer.hist_counts, dtype=np.float64)
        edges = np.asarray(layer.hist_edges, dtype=np.float64)
        used = np.nonzero(counts)[0]
        if used.size == 0 or not (math.isfinite(layer.min) and math.isfinite(layer.max)):
            return
        lo, hi = used[0], used[-1] + 1  # trim empty buckets at both ends
        finite = layer.count - layer.nan_count - layer.posinf_count - layer.neginf_count
        self._writer.add_histogram_raw(
            f"actmon/hist/{layer.name}",
            min=layer.min,
            max=layer.max,
            num=finite,
            sum=layer.mean * layer.count,
            sum_squares=(layer.std**2 + layer.mean**2) * layer.count,
            bucket_limits=edges[lo + 1 : hi + 1].tolist(),
            bucket_counts=counts[lo:hi].tolist(),
            global_step=step,
        )

    def write_alert(self, alert: Alert) -> None:
        self._writer.add_text("actmon/alerts", alert.message(), alert.step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
