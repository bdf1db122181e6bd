"""Build the HTML report: run summary, alert timeline, per-layer health over time, histogram
heatmaps, gradient norm by depth, and the worst layers with their runbook hints."""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import numpy as np

from actmon.store import RunStore, StoredAlert, first_nonfinite

MAX_HEATMAPS = 12  # layers with a histogram heatmap (the least healthy first)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 4px 10px;
border-bottom: 1px solid #eee; text-align: left; } .critical { color: #b00; font-weight: bold; }
.warning { color: #b60; } .info { color: #06b; } .ok { color: #080; } img { max-width: 100%; }
"""


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(fig: plt.Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{_png(fig)}">'


def _series(db: RunStore, metric: str, run: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step, layer, _, value in db.metrics(metric, run=run):
        if layer:
            out[layer].append((step, value))
    return out


def _line_plot(
    series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, log: bool = False
) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for layer, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker=".", label=layer)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if len(series) <= 20:
        ax.legend(fontsize=7, ncol=2, loc="best")
    return fig


def _heatmap(db: RunStore, layer: str, run: str) -> plt.Figure | None:
    hists = db.histograms(layer, run=run)
    if not hists:
        return None
    edges = hists[-1][1]
    counts = np.stack([c for _, _, c in hists], axis=1)  # bins x windows
    used = np.nonzero(counts.sum(axis=1))[0]
    if used.size == 0:
        return None
    lo, hi = used[0], used[-1] + 1
    fig, ax = plt.subplots(figsize=(10, 3))
    image = ax.imshow(
        np.log10(counts[lo:hi] + 1),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="viridis",
    )
    ticks = np.linspace(0, hi - lo - 1, min(6, hi - lo)).astype(int)
    ax.set_yticks(ticks, [f"{edges[lo + t]:.3g}" for t in ticks])
    steps = [s for s, _, _ in hists]
    xt = np.linspace(0, len(steps) - 1, min(8, len(steps))).astype(int)
    ax.set_xticks(xt, [str(steps[i]) for i in xt])
    ax.set_title(f"{layer}: activation distribution over time (colour: log10 count)")
    ax.set_xlabel("step")
    ax.set_ylabel("value (bin lower edge)")
    fig.colorbar(image, ax=ax)
    return fig


def _depth_plot(db: RunStore, run: str, order: list[str]) -> plt.Figure | None:
    series = _series(db, "grad_norm", run)
    layers = [name for name in order if name in series]
    if not layers:
        return None
    steps = sorted({s for name in layers for s, _ in series[name]})
    picks = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for step in picks:
        values = [dict(series[name]).get(step, math.nan) for name in layers]
        ax.plot(range(len(layers)), values, marker="o", label=f"step {step}")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_title("Parameter-gradient norm by depth")
    ax.set_ylabel("L2 norm")
    ax.legend()
    return fig


def _worst(db: RunStore, run: str) -> list[tuple[str, str, float]]:
    """(layer, metric, final value) of the least healthy layers, worst first."""
    rows = []
    for metric in ("dead_fraction", "dormant_fraction", "saturation_fraction"):
        for layer, points in _series(db, metric, run).items():
            rows.append((layer, metric, points[-1][1]))
    return sorted(rows, key=lambda r: r[2], reverse=True)[:10]


def _nonfinite_row(alerts: list[StoredAlert]) -> str:
    """The run summary's row for the first NaN/Inf (empty when the run had none)."""
    first = first_nonfinite(alerts)
    if first is None:
        return ""
    where = f"in layer {html.escape(first.layer)}" if first.layer else "in no sampled layer"
    found = (
        f" (layer found at step {first.confirmed_step})"
        if first.confirmed_step is not None and first.confirmed_step != first.step
        else ""
    )
    return (
        f"<tr><th>first NaN/Inf</th><td class='critical'>step {first.step}, {where}{found}"
        "</td></tr>"
    )


def write_report(store_path: str | Path, out: str | Path, run: str | None = None) -> Path:
    """Write the HTML report of one run of ``store_path`` to ``out``; returns the path."""
    with RunStore(store_path) as db:
        info = db.run(run)
        name = info.run
        windows = db.windows(name)
        alerts = db.alerts(name)
        order = [str(layer["name"]) for layer in info.layers]
        parts = [f"<h1>actmon report: {html.escape(name)}</h1>"]
        last = windows[-1].step if windows else 0
        # Info records (the 10-30% dead band) are for the record: not alerts to act on.
        firing = [a for a in alerts if a.state == "firing" and a.severity != "info"]
        records = sum(1 for a in alerts if a.state == "firing" and a.severity == "info")
        noted = f" ({records} info record{'s' if records != 1 else ''})" if records else ""
        verdict = (
            f"<span class='ok'>no alerts</span>{noted}"
            if not firing
            else f"<span class='critical'>{len(firing)} alert(s) fired</span>{noted}"
        )
        parts.append(
            f"<h2>Run summary</h2><table><tr><th>status</th><td>{html.escape(info.status)}</td>"
            f"</tr><tr><th>steps</th><td>{last}</td></tr><tr><th>windows</th>"
            f"<td>{len(windows)}</td></tr><tr><th>layers</th><td>{len(order)}</td></tr>"
            f"<tr><th>health</th><td>{verdict}</td></tr>{_nonfinite_row(alerts)}</table>"
        )
        parts.append("<h2>Alert timeline</h2>")
        if not firing:
            parts.append(f"<p class='ok'>No alert fired.{noted}</p>")
        if alerts:
            rows = "".join(
                f"<tr><td>{a.step}</td><td class='{a.severity}'>{a.severity}</td>"
                f"<td>{html.escape(a.rule)}</td><td>{html.escape(a.layer or '-')}</td>"
                f"<td>{a.state}</td><td>{a.value:.4g}</td><td>{html.escape(a.summary)}</td></tr>"
                for a in alerts
            )
            parts.append(
                "<table><tr><th>step</th><th>severity</th><th>rule</th><th>layer</th>"
                f"<th>state</th><th>value</th><th>summary</th></tr>{rows}</table>"
            )
            fig, ax = plt.subplots(figsize=(10, 2.2))
            rules = sorted({a.rule for a in alerts})
            for a in alerts:
                ax.scatter(
                    a.step,
                    rules.index(a.rule),
                    marker="v" if a.state == "firing" else "^",
                    color={"critical": "red", "warning": "orange"}.get(a.severity, "blue"),
                )
            ax.set_yticks(range(len(rules)), rules)
            ax.set_xlabel("step")
            ax.set_title("alerts: v fired, ^ resolved")
            parts.append(_img(fig, "alert timeline"))
        parts.append("<h2>Layer health over time</h2>")
        for metric, title in (
            ("dead_fraction", "Dead fraction (ReLU family)"),
            ("dormant_fraction", "Dormant fraction (leaky / GELU / SiLU)"),
            ("saturation_fraction", "Saturation fraction"),
        ):
            series = _series(db, metric, name)
            if series:
                parts.append(_img(_line_plot(series, title, metric), title))
        parts.append("<h2>Activation distributions over time</h2>")
        ranked = [layer for layer, _, _ in _worst(db, name)]
        for layer in list(dict.fromkeys(ranked + order))[:MAX_HEATMAPS]:
            heat = _heatmap(db, layer, name)
            if heat is not None:
                parts.append(f"<h3>{html.escape(layer)}</h3>" + _img(heat, f"{layer} heatmap"))
        parts.append("<h2>Gradient norm by depth</h2>")
        depth = _depth_plot(db, name, order)
        parts.append(
            _img(depth, "gradient norm by depth")
            if depth is not None
            else "<p>No parameter gradients were recorded.</p>"
        )
        parts.append("<h2>Worst layers</h2>")
        hints = {a.layer: a.runbook for a in alerts if a.layer}
        rows = "".join(
            f"<tr><td>{html.escape(layer)}</td><td>{metric}</td><td>{value:.3f}</td>"
            f"<td>{html.escape(hints.get(layer, ''))}</td></tr>"
            for layer, metric, value in _worst(db, name)
        )
        parts.append(
            "<table><tr><th>layer</th><th>metric</th><th>final value</th>"
            f"<th>runbook</th></tr>{rows}</table>"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>actmon report: "
        f"{html.escape(name)}</title><style>{_CSS}</style></head><body>{''.join(parts)}"
        "</body></html>\n",
        encoding="utf-8",
    )
    return out
