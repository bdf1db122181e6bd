"""Activation histograms as Prometheus histograms: fixed buckets, a bounded set of layers.

Prometheus needs one bucket layout for every series of a histogram, while each layer's own
histogram has its kind's edges (symmetric-log, or equal-width for bounded kinds). The export
uses fixed log-spaced bounds: +-4**k for k in -6..6 (+-2**-12 .. +-4096) and +Inf, 27 buckets.
A bucket ``le=b`` counts the window's values in the layer's bins whose upper edge is <= b, so
it is exact to within one bin of the layer's histogram (for the default symmetric-log view the
bounds are bin edges: a value exactly equal to a positive bound counts in the next bucket).

There is no ``_sum`` (outputs can be negative, and OpenMetrics allows a histogram sum only when
no bucket is negative, so prometheus_client leaves it and ``_count`` out): the ``+Inf`` bucket
is the count. Buckets are counters over the run (each window's fresh counts are added once; a
layer carried from an earlier window adds nothing), so ``increase()`` and Grafana's heatmap read
them as Prometheus expects. Layers are chosen by ``histogram_layers`` globs, in forward order, up to
``max_histogram_layers``; a layer that has series keeps them for the run.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np

from actmon.snapshot import LayerStats

log = logging.getLogger("actmon")

_MAGNITUDES = [4.0**k for k in range(-6, 7)]
BUCKET_BOUNDS: tuple[float, ...] = (
    *(-m for m in reversed(_MAGNITUDES)),
    *_MAGNITUDES,
)  # ascending; +Inf is implied


def cumulative_buckets(edges: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative counts at each of :data:`BUCKET_BOUNDS` and at +Inf.

    ``edges`` (n + 1, ascending) and ``counts`` (n) are a layer's histogram. Bin i counts toward
    bound b when its upper edge ``edges[i + 1]`` is <= b; +Inf takes every bin.
    """
    upper = np.asarray(edges, dtype=np.float64)[1:]
    cum = np.cumsum(np.asarray(counts, dtype=np.float64))
    # For each bound, the number of bins whose upper edge is <= it.
    taken = np.searchsorted(upper, np.asarray(BUCKET_BOUNDS), side="right")
    at_bounds = np.where(taken > 0, cum[np.maximum(taken - 1, 0)], 0.0)
    total = cum[-1] if len(cum) else 0.0
    return np.append(at_bounds, total)


class HistogramExport:
    """Which layers export a histogram, and their buckets accumulated over the run."""

    def __init__(self, globs: list[str], limit: int) -> None:
        self.globs = list(globs)
        self.limit = limit
        self.layers: dict[str, str] = {}  # name -> kind, in the order they got series
        self.buckets: dict[str, np.ndarray] = {}
        self._said_bounded = False

    def _wanted(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.globs)

    def add(self, fresh: list[LayerStats]) -> None:
        """Add a window's fresh layers (forward order) to the run's counters."""
        if not self.globs:
            return
        for layer in fresh:
            if layer.name not in self.layers:
                if not self._wanted(layer.name):
                    continue
                if len(self.layers) >= self.limit:
                    if not self._said_bounded:
                        self._said_bounded = True
                        log.warning(
                            "actmon: histogram export is limited to max_histogram_layers=%d"
                            " layers; %r and later matching layers have no histogram series",
                            self.limit,
                            layer.name,
                        )
                    continue
                self.layers[layer.name] = layer.kind.value
                self.buckets[layer.name] = np.zeros(len(BUCKET_BOUNDS) + 1)
            self.buckets[layer.name] += cumulative_buckets(layer.hist_edges, layer.hist_counts)
