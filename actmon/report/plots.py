"""The report's figures (matplotlib, no pyplot state): every time axis is in steps over the
whole run, with integer ticks and the NaN/Inf windows shaded.

Names from the store (layers, rules) reach matplotlib only through :func:`literal`, so a layer
called ``$x^2$`` is drawn as written, never as mathtext.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from actmon.report.data import Series
from actmon.store import StoredAlert, Window

Span = tuple[int, int]
NONFINITE_FACE = (0.85, 0.1, 0.1, 0.18)
NONFINITE_EDGE = (0.85, 0.1, 0.1, 0.6)
NONFINITE_LABEL = "NaN/Inf window"
_SEVERITY_COLOUR = {"critical": "#c00000", "warning": "#e08000", "info": "#3070b0"}


def literal(text: str) -> str:
    """``text`` for a matplotlib label: dollar signs escaped, so it is never read as math."""
    return text.replace("$", r"\$")


def png(fig: Figure) -> str:
    """The figure as a ``data:`` URI (the report is one self-contained file)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def time_axis(ax: Axes, span: Span, nonfinite: Sequence[Span]) -> None:
    """The run's whole step range, integer ticks at 1/2/5 x 10^k, NaN/Inf windows shaded."""
    ax.set_xlim(*span)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel("step")
    for i, (lo, hi) in enumerate(nonfinite):
        ax.axvspan(
            lo,
            hi,
            hatch="//",
            facecolor=NONFINITE_FACE,
            edgecolor=NONFINITE_EDGE,
            label=NONFINITE_LABEL if i == 0 else None,
        )


def _finite(points: Series) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values with non-finite values as NaN (gaps in a line)."""
    steps = np.array([s for s, _ in points], dtype=float)
    values = np.array([v for _, v in points], dtype=float)
    values[~np.isfinite(values)] = np.nan
    return steps, values


def _value_axis(ax: Axes, values: np.ndarray, label: str) -> None:
    """Log scale when every value is positive and they span over two decades; a constant
    series gets a range around it instead of matplotlib's +-0.04 with fractional ticks."""
    finite = values[np.isfinite(values)]
    if wide_positive(finite):
        log_scale(ax, "y")
        label += " (log scale)"
    elif finite.size and finite.min() == finite.max():
        v = float(finite[0])
        ax.set_ylim(*((0.0, 1.0) if v == 0 else sorted((0.0, 2 * v))))
    ax.set_ylabel(label)


def wide_positive(finite: np.ndarray) -> bool:
    """Whether values read better on a log scale: all positive, spanning over two decades."""
    return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 100)


def log_scale(ax: Axes, which: str) -> None:
    """A log axis labelled at powers of ten in plain numbers (0.01, 1e-6), minor ticks bare."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_locator(LogLocator(base=10.0, numticks=8))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _number(v)))
    axis.set_minor_formatter(NullFormatter())


def _legend(ax: Axes, entries: int) -> None:
    if 0 < entries <= 20:
        ax.legend(fontsize=8, ncol=2 if entries > 6 else 1, loc="best")


def run_curves(
    loss: Series, grad_norm: Series, grad_norm_max: Series, span: Span, nonfinite: Sequence[Span]
) -> Figure | None:
    """The loss and the total gradient norm over the run (one panel each)."""
    panels = [(p, t) for p, t in ((loss, "loss"), (grad_norm, "gradient norm")) if p]
    if not panels:
        return None
    fig = _figure(10, 2.8 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (points, title) in zip(axes, panels, strict=True):
        steps, values = _finite(points)
        if title == "loss":
            ax.plot(steps, values, marker=".", label="window mean")
            ax.set_title("Loss (mean over each window)")
            _value_axis(ax, values, "loss")
        else:
            ax.plot(steps, values, marker=".", label="RMS over the window's steps")
            both = values
            if grad_norm_max:
                max_steps, max_values = _finite(grad_norm_max)
                ax.plot(max_steps, max_values, ls="--", lw=1, label="largest step")
                both = np.concatenate([values, max_values])
            ax.set_title("Total gradient norm (all parameters, L2)")
            _value_axis(ax, both, "L2 norm")
        time_axis(ax, span, nonfinite)
        ax.legend(fontsize=8, loc="best")
    return fig


def fraction_curves(
    series: dict[str, Series], title: str, span: Span, nonfinite: Sequence[Span]
) -> Figure:
    """One line per layer of a fraction metric, as a percentage from 0."""
    fig = _figure(10, 3.4)
    ax = fig.subplots()
    top = 0.0
    for layer, points in series.items():
        steps, values = _finite(points)
        ax.plot(steps, values, marker=".", label=literal(layer))
        if np.isfinite(values).any():
            top = max(top, float(np.nanmax(values)))
    # From 0, and at least 0-10%: a flat 0% line sits at the bottom of a readable axis.
    ax.set_ylim(0.0, min(1.0, max(0.1, top * 1.15)) if top < 1.0 else 1.05)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.4g}%"))
    ax.set_ylabel("share of the layer's units")
    ax.set_title(title)
    time_axis(ax, span, nonfinite)
    _legend(ax, len(series) + (1 if nonfinite else 0))
    return fig


def heatmap(
    hists: list[tuple[int, np.ndarray, np.ndarray]],
    windows: list[Window],
    span: Span,
    nonfinite: Sequence[Span],
    title: str,
) -> Figure | None:
    """A layer's activation histogram per window (columns at the window's steps), rows in the
    histogram's own bins (symmetric-log or linear) with ticks at round values."""
    if not hists or not windows:
        return None
    edges = np.asarray(hists[-1][1], dtype=float)
    if edges.size < 2 or not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
        return None
    column = {w.step: i for i, w in enumerate(windows)}
    counts = np.full((edges.size - 1, len(windows)), np.nan)
    for step, _, c in hists:
        if step in column and len(c) == edges.size - 1:
            counts[:, column[step]] = np.clip(np.nan_to_num(c, nan=0.0), 0.0, None)
    used = np.nonzero(np.nansum(counts, axis=1))[0]
    if used.size == 0:
        return None
    lo, hi = int(used[0]), int(used[-1]) + 1
    x = np.array([windows[0].first_step - 1] + [w.last_step for w in windows], dtype=float)
    fig = _figure(10, 3.0)
    ax = fig.subplots()
    mesh = ax.pcolormesh(
        x, np.arange(lo, hi + 1), np.log10(counts[lo:hi] + 1), cmap="viridis", shading="flat"
    )
    ticks = _spaced(_value_ticks(edges, lo, hi), edges, (hi - lo) / 10)
    ax.set_yticks(list(ticks), [_number(v) for v in ticks.values()])
    ax.set_ylim(lo, hi)
    ax.set_ylabel("activation value")
    ax.set_title(title)
    time_axis(ax, span, nonfinite)
    if nonfinite:
        ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(mesh, ax=ax, label="log10(count + 1)")
    return fig


def _value_ticks(edges: np.ndarray, lo: int, hi: int) -> list[float]:
    """Round values inside bins lo..hi: 0 and signed powers of ten for symmetric-log edges,
    evenly spaced round numbers for linear ones."""
    low, high = float(edges[lo]), float(edges[hi])
    widths = np.diff(edges)
    if np.allclose(widths, widths[0], rtol=1e-6):  # linear bins (bounded kinds)
        values = MaxNLocator(nbins=6).tick_values(low, high)
        return [float(v) for v in values if low <= v <= high]
    positive = edges[edges > 0]
    smallest = float(positive.min()) if positive.size else 1.0  # the centre bin's half-width
    ticks: list[float] = [0.0] if low < 0 < high or low <= 0 <= high else []
    for sign in (-1.0, 1.0):
        bound = high if sign > 0 else -low
        if bound <= smallest:
            continue
        decades = list(range(math.ceil(math.log10(smallest)), math.floor(math.log10(bound)) + 1))
        step = max(1, math.ceil(len(decades) / 4))  # at most ~4 labels per sign
        chosen = decades[::-1][::step][::-1]  # keep the largest decade
        ticks += [sign * 10.0**k for k in chosen]
    return sorted(ticks)


def _spaced(values: list[float], edges: np.ndarray, gap: float) -> dict[float, float]:
    """{row position: value} of the tick values at least ``gap`` rows apart; 0 and the largest
    magnitudes win (labels next to the centre bin would overlap it)."""
    rows = np.arange(edges.size)
    kept: dict[float, float] = {}
    for value in sorted(values, key=lambda v: (v != 0, -abs(v))):
        y = float(np.interp(value, edges, rows))
        if all(abs(y - other) >= gap for other in kept):
            kept[y] = value
    return dict(sorted(kept.items()))


def _number(value: float) -> str:
    """A tick label: 0, plain numbers from 0.001 to 9999, 1e-6 style beyond."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e4:
        return f"{value:g}"
    exponent = math.floor(math.log10(magnitude) + 1e-9)
    mantissa = value / 10.0**exponent
    head = f"{mantissa:g}" if abs(abs(mantissa) - 1) > 1e-9 else ("-1" if value < 0 else "1")
    return f"{head}e{exponent}"


def alert_timeline(
    alerts: list[StoredAlert], span: Span, nonfinite: Sequence[Span]
) -> Figure | None:
    """One row per (rule, layer): a bar from each firing to its resolution (or the run's end)."""
    rows: dict[tuple[str, str | None], list[tuple[int, int | None, str]]] = {}
    for a in alerts:
        key = (a.rule, a.layer)
        if a.state == "firing":
            rows.setdefault(key, []).append((a.step, None, a.severity))
        elif a.state == "resolved" and rows.get(key) and rows[key][-1][1] is None:
            start, _, severity = rows[key][-1]
            rows[key][-1] = (start, a.step, severity)
    if not rows:
        return None
    fig = _figure(10, 1.4 + 0.32 * len(rows))
    ax = fig.subplots()
    minimum = max(1.0, (span[1] - span[0]) / 200)  # a zero-length firing stays visible
    for y, events in enumerate(rows.values()):
        for start, end, severity in events:
            stop = span[1] if end is None else end
            colour = _SEVERITY_COLOUR.get(severity, "grey")
            ax.broken_barh([(start, max(stop - start, minimum))], (y - 0.3, 0.6), color=colour)
            ax.plot([start], [y], marker="v", color="black", ms=5)
    labels = [literal(rule if layer is None else f"{rule} ({layer})") for rule, layer in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first alert at the top
    ax.set_title("Alerts over the run (bar: firing until resolved or the run's end)")
    time_axis(ax, span, nonfinite)
    handles = [Patch(color=c, label=s) for s, c in _SEVERITY_COLOUR.items()]
    if nonfinite:
        handles.append(
            Patch(
                label=NONFINITE_LABEL,
                hatch="//",
                facecolor=NONFINITE_FACE,
                edgecolor=NONFINITE_EDGE,
            )
        )
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def depth_profile(series: dict[str, Series], layers: list[tuple[str, str]]) -> Figure | None:
    """Parameter-gradient norm of each layer (forward order, input at the top) at the run's
    first, middle and last window: vanishing gradients fall off towards the top."""
    names = [(name, kind) for name, kind in layers if name in series]
    if not names:
        return None
    # Windows with a finite norm somewhere (after a NaN blow-up every norm may be NaN).
    steps = sorted({s for name, _ in names for s, v in series[name] if math.isfinite(v)})
    if not steps:
        return None
    picks = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    fig = _figure(10, 1.6 + 0.3 * min(len(names), 60))
    ax = fig.subplots()
    everything = []
    for step in picks:
        values = np.array([dict(series[name]).get(step, math.nan) for name, _ in names])
        values[~np.isfinite(values)] = np.nan
        everything.append(values)
        ax.plot(values, range(len(names)), marker="o", label=f"step {step}")
    every = max(1, math.ceil(len(names) / 60))  # at most 60 labels; every layer is plotted
    ax.set_yticks(
        range(0, len(names), every),
        [literal(f"{name} ({kind})") for name, kind in names[::every]],
        fontsize=9,
    )
    ax.set_ylim(len(names) - 0.5, -0.5)
    values = np.concatenate(everything)
    finite = values[np.isfinite(values)]
    label = "parameter-gradient L2 norm"
    if wide_positive(finite):
        log_scale(ax, "x")
        label += " (log scale)"
    ax.set_xlabel(label)
    ax.set_ylabel("layer (forward order, input at the top)")
    ax.set_title("Parameter-gradient norm by depth")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
