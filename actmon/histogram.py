"""Host-side histogram helpers: the fixed edges of the device bins, exported views, quantiles.

Computing is the kernels' job (``stats.py``); this module only reads the counts they made.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from actmon.stats import HALF, INF_J

_FINITE_J = INF_J  # magnitude bins 0..1019 hold finite values


@lru_cache(maxsize=1)
def magnitude_edges() -> np.ndarray:
    """Lower edges of the 1020 finite magnitude bins plus the upper edge of the last (float64)."""
    j = np.arange(_FINITE_J + 1)
    exponent, sub = j >> 2, j & 3
    normal = np.ldexp(1.0 + sub / 4.0, exponent - 127)
    subnormal = np.ldexp(sub.astype(np.float64), -128)
    return np.where(exponent == 0, subnormal, normal)


@lru_cache(maxsize=1)
def full_edges() -> np.ndarray:
    """Ascending edges of the 2040 finite raw bins: negatives (largest first), then positives."""
    mag = magnitude_edges()
    return np.concatenate([-mag[::-1], mag[1:]])


def full_counts(raw: np.ndarray) -> np.ndarray:
    """Finite raw counts (2048 bins) re-ordered to match :func:`full_edges`."""
    negative = raw[:_FINITE_J][::-1]
    positive = raw[HALF : HALF + _FINITE_J]
    return np.concatenate([negative, positive])


@lru_cache(maxsize=16)
def symlog_view_map(
    min_exp: int, max_exp: int, bins_per_octave: int
) -> tuple[np.ndarray, np.ndarray]:
    """(edges of the exported view, view bin of each full bin) for a symmetric-log view.

    The view has ``octaves * bins_per_octave`` bins per sign and one centre bin for
    ``|x| < 2**min_exp`` (zeros included); values beyond ``2**max_exp`` fold into the outer bins.
    """
    per_sign = (max_exp - min_exp) * bins_per_octave
    step = 4 // bins_per_octave
    j = np.arange(_FINITE_J)
    exponent, sub = (j >> 2) - 127, j & 3
    pos_view = (exponent - min_exp) * bins_per_octave + sub // step
    pos_view = np.where(exponent == -127, -1, pos_view)  # subnormals (and zero): centre
    pos_view = np.clip(pos_view, -1, per_sign - 1)  # below 2**min_exp: centre; above: last bin
    centre = per_sign
    positive = centre + 1 + pos_view  # centre + 1 + (-1) == centre
    negative = centre - 1 - pos_view
    mapping = np.concatenate([negative[::-1], positive])
    octave_edges = np.ldexp(
        1.0 + (np.arange(per_sign) % bins_per_octave) / bins_per_octave,
        min_exp + np.arange(per_sign) // bins_per_octave,
    )
    upper = np.append(octave_edges[1:], np.ldexp(1.0, max_exp))
    edges = np.concatenate([-upper[::-1], [-np.ldexp(1.0, min_exp)], octave_edges])
    edges = np.append(edges, np.ldexp(1.0, max_exp))
    return edges, mapping


def symlog_view(
    raw: np.ndarray, min_exp: int, max_exp: int, bins_per_octave: int
) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of the exported symmetric-log histogram from 2048 raw counts."""
    edges, mapping = symlog_view_map(min_exp, max_exp, bins_per_octave)
    counts = np.bincount(mapping, weights=full_counts(raw), minlength=len(edges) - 1)
    return edges, counts


def linear_edges(low: float, high: float, bins: int) -> np.ndarray:
    return np.linspace(low, high, bins + 1)


def quantiles(
    edges: np.ndarray,
    counts: np.ndarray,
    qs: list[float],
    lo: float,
    hi: float,
    zero_bins: bool = False,
) -> dict[float, float]:
    """Quantiles read from a histogram by linear interpolation inside the bin, clamped to [lo, hi].

    The true quantile lies in the same bin, so the error is at most that bin's width.
    ``zero_bins``: a quantile that falls in a bin with an edge at 0 reads 0.0. That is for the
    raw bit-pattern bins (:func:`full_edges`), whose two zero bins are ``[-2**-128, -0]`` and
    ``[+0, 2**-128)``: they hold exact zeros (ReLU outputs) and subnormals, and interpolating
    inside them would report a zero as a denormal such as 2.5e-39.
    """
    total = float(counts.sum())
    if total <= 0:
        return {q: float("nan") for q in qs}
    cumulative = np.cumsum(counts, dtype=np.float64)
    targets = np.asarray(qs, dtype=np.float64) * total
    bins = np.minimum(np.searchsorted(cumulative, targets, side="left"), len(counts) - 1)
    before = np.where(bins > 0, cumulative[np.maximum(bins - 1, 0)], 0.0)
    inside = counts[bins].astype(np.float64)
    frac = np.divide(targets - before, inside, out=np.zeros_like(targets), where=inside > 0)
    values = edges[bins] + frac * (edges[bins + 1] - edges[bins])
    if zero_bins:
        values = np.where((edges[bins] == 0) | (edges[bins + 1] == 0), 0.0, values)
    if np.isfinite(lo):
        values = np.maximum(values, lo)
    if np.isfinite(hi):
        values = np.minimum(values, hi)
    return {q: float(v) for q, v in zip(qs, values, strict=True)}
