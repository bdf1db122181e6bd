"""Build the HTML report: run summary, loss and gradient norm, alert timeline, per-layer health
over time, histogram heatmaps, gradient norm by depth, and the worst layers with their runbook
hints.

Every value that comes from the store (names, states, messages, numbers) is HTML-escaped where
it is written: a store is input, and a crafted one must not run script in the reader's browser.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from actmon.errors import ActmonError
from actmon.report import data as rd
from actmon.report import plots
from actmon.store import RunStore, StoredAlert, first_nonfinite

MAX_HEATMAPS = 12  # layers with a histogram heatmap (the least healthy first)
MAX_LINES = 10  # layers per health plot (those with the highest peak; more is unreadable)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 4px 10px;
border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
.critical { color: #b00; font-weight: bold; } .warning { color: #b60; } .info { color: #06b; }
.ok { color: #080; } .kind { color: #666; font-weight: normal; } .note { color: #555; }
img { max-width: 100%; } td.num { white-space: nowrap; }
code { background: #f4f4f4; padding: 0 3px; }
"""
_SEVERITIES = ("critical", "warning", "info")


class ReportError(ActmonError, ValueError):
    """The report cannot be written as asked (e.g. its output is the run store it reads)."""


def _e(value: object) -> str:
    """HTML text (and attribute value) for anything read from the store."""
    return html.escape(str(value), quote=True)


def _img(fig: Figure | None, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="{plots.png(fig)}">' if fig is not None else ""


def _severity_class(severity: str) -> str:
    return severity if severity in _SEVERITIES else ""


def _refuse_overwrite(store: Path, out: Path) -> None:
    """Never write the HTML over the store (or its WAL/SHM/journal files), however named."""
    target = out.resolve()
    source = store.resolve()
    guarded = [source] + [source.with_name(source.name + s) for s in ("-wal", "-shm", "-journal")]
    same = target in guarded or (out.exists() and store.exists() and os.path.samefile(out, store))
    if same:
        raise ReportError(
            f"report output {str(out)!r} is the run store {str(store)!r} being reported (or one of"
            " its files): writing the HTML there would destroy the store; give another output"
            " path, e.g. -o report.html"
        )


def _nonfinite_row(alerts: list[StoredAlert]) -> str:
    """The run summary's row for the first NaN/Inf (empty when the run had none)."""
    first = first_nonfinite(alerts)
    if first is None:
        return ""
    where = f"in layer {_e(first.layer)}" if first.layer else "in no sampled layer"
    found = (
        f" (layer found at step {_e(first.confirmed_step)})"
        if first.confirmed_step is not None and first.confirmed_step != first.step
        else ""
    )
    return (
        f"<tr><th>first NaN/Inf</th><td class='critical'>step {_e(first.step)}, {where}{found}"
        "</td></tr>"
    )


def _summary(run: rd.RunData, firing: list[StoredAlert], noted: str) -> str:
    verdict = (
        f"<span class='ok'>no alerts</span>{noted}"
        if not firing
        else f"<span class='critical'>{len(firing)} alert(s) fired</span>{noted}"
    )
    last = run.windows[-1].step if run.windows else 0
    notes = "".join(f"<li>{_e(n)}</li>" for n in run.notes)
    return (
        f"<h2>Run summary</h2><table><tr><th>status</th><td>{_e(run.info.status)}</td>"
        f"</tr><tr><th>steps</th><td>{_e(last)}</td></tr><tr><th>windows</th>"
        f"<td>{len(run.windows)}</td></tr><tr><th>layers</th><td>{len(run.layers)}</td></tr>"
        f"<tr><th>health</th><td>{verdict}</td></tr>{_nonfinite_row(run.alerts)}</table>"
        + (
            f"<p class='note'>Parts of this store were unusable:</p><ul>{notes}</ul>"
            if notes
            else ""
        )
    )


def _alerts_table(alerts: list[StoredAlert]) -> str:
    rows = "".join(
        f"<tr><td>{_e(a.step)}</td><td class='{_severity_class(a.severity)}'>{_e(a.severity)}"
        f"</td><td>{_e(a.rule)}</td><td>{_e(a.layer or '-')}</td><td>{_e(a.state)}</td>"
        f"<td>{_e(f'{a.value:.4g}')}</td><td>{_e(a.summary)}</td></tr>"
        for a in alerts
    )
    return (
        "<table><tr><th>step</th><th>severity</th><th>rule</th><th>layer</th>"
        f"<th>state</th><th>value</th><th>summary</th></tr>{rows}</table>"
    )


def _steps(span: tuple[int, int] | None) -> str:
    return "" if span is None else f" (first in steps {span[0]}-{span[1]})"


def _worst_table(worst: list[rd.WorstLayer]) -> str:
    if not worst:
        return "<p>No layer has a dead, dormant or saturation figure or a NaN/Inf value.</p>"
    rows = []
    for w in worst:
        nonfinite = (
            f"<span class='critical'>{w.nonfinite_total:.0f} in {w.nonfinite_windows} window"
            f"{'s' if w.nonfinite_windows != 1 else ''}{_steps(w.first_nonfinite)}</span>"
            if w.nonfinite_windows
            else "-"
        )
        worst_value = "-" if w.metric is None else f"{w.worst:.3f} (step {w.worst_step})"
        final = "-" if w.metric is None or math.isnan(w.final) else f"{w.final:.3f}"
        rows.append(
            f"<tr><td>{_e(w.name)}</td><td>{_e(w.kind)}</td><td>{nonfinite}</td>"
            f"<td>{_e(w.metric or '-')}</td><td class='num'>{_e(worst_value)}</td>"
            f"<td class='num'>{_e(final)}</td>"
            f"<td>{_e(w.hint)}</td></tr>"
        )
    return (
        "<p>Ranked by each layer's worst window: any NaN/Inf first, then the largest dead,"
        " dormant or saturated fraction.</p><table><tr><th>layer</th><th>kind</th>"
        "<th>NaN/Inf values</th><th>metric</th><th>worst (step)</th><th>final</th>"
        f"<th>runbook</th></tr>{''.join(rows)}</table>"
    )


def _heatmaps(
    db: RunStore, run: rd.RunData, worst: list[rd.WorstLayer], cap: int, spans: list[plots.Span]
) -> str:
    kinds = run.kinds
    candidates = list(dict.fromkeys([w.name for w in worst] + [layer.name for layer in run.layers]))
    parts, drawn = [], 0
    for name in candidates:
        if cap and drawn >= cap:
            break
        kind = kinds.get(name, "?")
        title = plots.literal(f"{name} ({kind}): activation distribution per window")
        fig = plots.heatmap(db.histograms(name, run=run.name), run.windows, run.span, spans, title)
        if fig is None:
            continue
        drawn += 1
        parts.append(
            f"<h3>{_e(name)} <span class='kind'>({_e(kind)})</span></h3>"
            + _img(fig, f"{name} heatmap")
        )
    if cap and drawn >= cap and len(candidates) > drawn:
        parts.insert(
            0,
            f"<p class='note'>Showing {drawn} of {len(candidates)} layers (the least healthy"
            " first, then in forward order); raise the cap with <code>actmon report"
            " --max-heatmaps N</code> (0 draws every layer) or <code>write_report(...,"
            " max_heatmaps=N)</code>.</p>",
        )
    if not parts:
        parts.append("<p>No activation histograms were recorded.</p>")
    return "".join(parts)


def _body(db: RunStore, run: rd.RunData, max_heatmaps: int) -> list[str]:
    name = run.name
    spans = rd.nonfinite_windows(db, run)
    # Info records (the 10-30% dead band) are for the record: not alerts to act on.
    alerts = run.alerts
    firing = [a for a in alerts if a.state == "firing" and a.severity != "info"]
    records = sum(1 for a in alerts if a.state == "firing" and a.severity == "info")
    noted = f" ({records} info record{'s' if records != 1 else ''})" if records else ""
    parts = [f"<h1>actmon report: {_e(name)}</h1>", _summary(run, firing, noted)]
    if not run.windows:
        parts.append("<p class='note'>No window was recorded: no step ended in this run.</p>")
    if spans:
        parts.append(
            "<p class='critical'>Shaded, hatched spans on every time axis below are the windows"
            f" with NaN/Inf values ({len(spans)} span{'s' if len(spans) != 1 else ''}).</p>"
        )
    parts.append("<h2>Loss and gradient norm</h2>")
    curves = plots.run_curves(
        rd.run_series(db, name, "loss"),
        rd.run_series(db, name, "grad_norm_total"),
        rd.run_series(db, name, "grad_norm_total_max"),
        run.span,
        spans,
    )
    parts.append(
        _img(curves, "loss and total gradient norm")
        if curves is not None
        else "<p>No loss or gradient norm was recorded (pass <code>loss=</code> to"
        " <code>monitor.step</code>).</p>"
    )
    parts.append("<h2>Alert timeline</h2>")
    if not firing:
        parts.append(f"<p class='ok'>No alert fired.{noted}</p>")
    if alerts:
        parts.append(_alerts_table(alerts))
        parts.append(_img(plots.alert_timeline(alerts, run.span, spans), "alert timeline"))
    parts.append("<h2>Layer health over time</h2>")
    drawn = len(parts)
    for metric, title in (
        ("dead_fraction", "Dead fraction (ReLU family)"),
        ("dormant_fraction", "Dormant fraction (leaky / GELU / SiLU)"),
        ("saturation_fraction", "Saturation fraction (sigmoid / tanh / clipping)"),
    ):
        series = rd.in_order(rd.layer_series(db, name, metric), run.layers)
        if series:
            shown = rd.highest(series, MAX_LINES)
            heading = title
            if len(shown) < len(series):
                heading += f": the {len(shown)} highest of {len(series)} layers"
            parts.append(_img(plots.fraction_curves(shown, heading, run.span, spans), title))
    if len(parts) == drawn:
        parts.append("<p>No layer has a dead, dormant or saturation figure.</p>")
    worst = rd.worst_layers(db, run)
    parts.append("<h2>Activation distributions over time</h2>")
    parts.append(_heatmaps(db, run, worst, max_heatmaps, spans))
    parts.append("<h2>Gradient norm by depth</h2>")
    depth = plots.depth_profile(
        rd.layer_series(db, name, "grad_norm"), [(la.name, la.kind) for la in run.layers]
    )
    parts.append(
        _img(depth, "gradient norm by depth")
        if depth is not None
        else "<p>No parameter gradients were recorded.</p>"
    )
    parts.append("<h2>Worst layers</h2>")
    parts.append(_worst_table(worst))
    return parts


def write_report(
    store_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    run: str | None = None,
    max_heatmaps: int = MAX_HEATMAPS,
) -> Path:
    """Write the HTML report of one run of ``store_path`` to ``out``; returns the path.

    ``max_heatmaps`` caps the histogram heatmaps (least healthy layers first; 0: every layer).
    """
    if isinstance(max_heatmaps, bool) or not isinstance(max_heatmaps, int) or max_heatmaps < 0:
        raise ReportError(f"max_heatmaps: got {max_heatmaps!r}, must be an integer >= 0")
    store, target = Path(store_path), Path(out)
    _refuse_overwrite(store, target)
    # No LaTeX, whatever the user's matplotlibrc says: names are drawn as plain text.
    with matplotlib.rc_context({"text.usetex": False}), RunStore(store) as db:
        run_data = rd.read_run(db, run)
        parts = _body(db, run_data, max_heatmaps)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>actmon report: "
        f"{_e(run_data.name)}</title><style>{_CSS}</style></head><body>{''.join(parts)}"
        "</body></html>\n",
        encoding="utf-8",
    )
    return target
