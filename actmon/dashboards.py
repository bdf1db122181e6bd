"""Grafana dashboards, built with the maintained grafana-foundation-sdk (not hand-edited JSON).

``python -m actmon.dashboards dashboards/`` writes ``actmon-overview.json`` and
``actmon-layer.json``. Every panel queries only ``actmon_*`` metrics the Prometheus sink
exports, through a Prometheus data-source variable (no hard-coded UID); the tests run each
query against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

try:
    from grafana_foundation_sdk.builders import (
        barchart,
        dashboard,
        heatmap,
        prometheus,
        stat,
        timeseries,
    )
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat
except ImportError as exc:  # pragma: no cover - a dev-time generator
    raise ImportError(
        "generating dashboards needs grafana-foundation-sdk: pip install 'actmon[dev]'"
    ) from exc

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'run="$run"'
LAYER = 'run="$run", layer="$layer"'
# A second run overlaid on the time series (the Baseline variable; empty: no overlay).
BASELINE = 'run="$baseline"'
BASELINE_LAYER = 'run="$baseline", layer="$layer"'
# Every layer's gradient norm with its forward-order depth (zero-padded, so it sorts).
GRAD_BY_DEPTH = (
    f"actmon_grad_norm{{{RUN}}} * on(run, layer) group_left(depth) actmon_layer_info{{{RUN}}}"
)


def _query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return q.legend_format(legend) if legend else q


def _timeseries(
    title: str, queries: list[tuple[str, str]], pos: tuple[int, int, int, int], unit: str = ""
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=pos[0], y=pos[1], w=pos[2], h=pos[3]))
    )
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel.unit(unit) if unit else panel


def _variables(board: dashboard.Dashboard, with_layer: bool) -> dashboard.Dashboard:
    board = board.with_variable(
        dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    )
    board = board.with_variable(
        dashboard.QueryVariable("run")
        .label("Run")
        .datasource(DATASOURCE)
        .query("label_values(actmon_step, run)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    board = board.with_variable(
        dashboard.QueryVariable("baseline")
        .label("Baseline run")
        .description("A second run overlaid on the time series, e.g. the last good run.")
        .datasource(DATASOURCE)
        .query("label_values(actmon_step, run)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    if with_layer:
        board = board.with_variable(
            dashboard.QueryVariable("layer")
            .label("Layer")
            .datasource(DATASOURCE)
            .query(f"label_values(actmon_activation_mean{{{RUN}}}, layer)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    return board


def overview() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("actmon — run overview")
        .uid("actmon-overview")
        .tags(["actmon"])
        .refresh("10s")
        .time("now-1h", "now")
    )
    board = _variables(board, with_layer=False)
    firing = (
        stat.Panel()
        .title("Alerts firing")
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=0, y=0, w=8, h=6))
        .with_target(
            _query(
                f"sum by (rule, layer, severity) (actmon_alert_active{{{RUN}}})",
                "{{rule}} {{layer}} ({{severity}})",
            )
        )
    )
    panels = [
        firing,
        _timeseries(
            "Alert history",
            [(f"increase(actmon_alerts_total{{{RUN}}}[5m])", "{{rule}} ({{severity}})")],
            (8, 0, 16, 6),
        ),
        _timeseries(
            "Loss",
            [
                (f"actmon_loss{{{RUN}}}", "loss"),
                (f"actmon_loss{{{BASELINE}}}", "baseline {{run}}"),
            ],
            (0, 6, 12, 8),
        ),
        _timeseries(
            "Total gradient norm",
            [
                (f"actmon_grad_norm_total{{{RUN}}}", "grad norm"),
                (f"actmon_grad_norm_total{{{BASELINE}}}", "baseline {{run}}"),
            ],
            (12, 6, 12, 8),
        ),
        _timeseries(
            "Worst layers: dead fraction",
            [(f"topk(5, actmon_dead_fraction{{{RUN}}})", "{{layer}}")],
            (0, 14, 12, 8),
            "percentunit",
        ),
        _timeseries(
            "Worst layers: saturated fraction",
            [(f"topk(5, actmon_saturation_fraction{{{RUN}}})", "{{layer}}")],
            (12, 14, 12, 8),
            "percentunit",
        ),
        _timeseries(
            "NaN / Inf values",
            [
                (
                    f"sum by (layer, tensor, value) (actmon_nonfinite_total{{{RUN}}})",
                    "{{layer}} {{tensor}} {{value}}",
                )
            ],
            (0, 22, 12, 8),
        ),
        _timeseries(
            "Monitor cost",
            [
                (f"rate(actmon_overhead_seconds_total{{{RUN}}}[5m])", "seconds per second"),
                (f"sum(actmon_internal_errors_total{{{RUN}}})", "internal errors"),
            ],
            (12, 22, 12, 8),
        ),
        heatmap.Panel()
        .title("Dead fraction: layer x time")
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=0, y=30, w=24, h=10))
        .with_target(
            _query(f"actmon_dead_fraction{{{RUN}}}", "{{layer}}").format(
                PromQueryFormat.TIME_SERIES
            )
        ),
        barchart.Panel()
        .title("Gradient norm by depth (latest window, every exported layer)")
        .description(
            "Parameter-gradient L2 norm of each layer in forward order (input first):"
            " vanishing gradients show as bars falling toward the input."
        )
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=0, y=40, w=24, h=9))
        .x_field("depth")
        .x_tick_label_rotation(-45)
        .axis_label("gradient norm")
        .with_target(
            _query(GRAD_BY_DEPTH, "{{depth}} {{layer}}").instant().format(PromQueryFormat.TABLE)
        ),
        _timeseries(
            "Gradient norm by depth over time",
            [(GRAD_BY_DEPTH, "{{depth}} {{layer}}")],
            (0, 49, 24, 9),
        ),
        _timeseries(
            "Mixed precision: skipped steps",
            [
                (f"actmon_amp_skipped_steps{{{RUN}}}", "skipped steps per window"),
                (f"actmon_amp_skip_fraction{{{RUN}}}", "share of steps skipped"),
            ],
            (0, 58, 12, 8),
        ),
        _timeseries(
            "Mixed precision: loss scale",
            [
                (f"actmon_loss_scale{{{RUN}}}", "loss scale"),
                (f"actmon_loss_scale{{{BASELINE}}}", "baseline {{run}}"),
            ],
            (12, 58, 12, 8),
        ),
    ]
    for panel in panels:
        board = board.with_panel(panel)
    return board


def layer() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("actmon — layer drill-down")
        .uid("actmon-layer")
        .tags(["actmon"])
        .refresh("10s")
        .time("now-1h", "now")
    )
    board = _variables(board, with_layer=True)
    panels = [
        _timeseries(
            "Activation quantiles",
            [
                (f"actmon_activation_quantile{{{LAYER}}}", "q{{quantile}}"),
                (f"actmon_activation_quantile{{{BASELINE_LAYER}}}", "baseline q{{quantile}}"),
            ],
            (0, 0, 12, 8),
        ),
        _timeseries(
            "Mean, std, |max|",
            [
                (f"actmon_activation_mean{{{LAYER}}}", "mean"),
                (f"actmon_activation_std{{{LAYER}}}", "std"),
                (f"actmon_activation_abs_max{{{LAYER}}}", "|max|"),
            ],
            (12, 0, 12, 8),
        ),
        _timeseries(
            "Zero, dead, dormant, saturated",
            [
                (f"actmon_zero_fraction{{{LAYER}}}", "zero"),
                (f"actmon_dead_fraction{{{LAYER}}}", "dead"),
                (f"actmon_dormant_fraction{{{LAYER}}}", "dormant"),
                (f"actmon_saturation_fraction{{{LAYER}}}", "saturated"),
            ],
            (0, 8, 12, 8),
            "percentunit",
        ),
        _timeseries(
            "Gradient norms",
            [
                (f"actmon_grad_norm{{{LAYER}}}", "parameters"),
                (f"actmon_output_grad_norm{{{LAYER}}}", "output"),
            ],
            (12, 8, 12, 8),
        ),
        _timeseries(
            "Update ratio", [(f"actmon_update_ratio{{{LAYER}}}", "||dw|| / ||w||")], (0, 16, 12, 8)
        ),
        _timeseries(
            "NaN / Inf",
            [(f"actmon_nonfinite_total{{{LAYER}}}", "{{tensor}} {{value}}")],
            (12, 16, 12, 8),
        ),
        heatmap.Panel()
        .title("Activation histogram over time (layers in sinks.prometheus.histogram_layers)")
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=0, y=24, w=24, h=10))
        .with_target(
            _query(
                f"sum by (le) (increase(actmon_activation_bucket{{{LAYER}}}[$__rate_interval]))",
                "{{le}}",
            ).format(PromQueryFormat.HEATMAP)
        ),
    ]
    for panel in panels:
        board = board.with_panel(panel)
    return board


DASHBOARDS = {"actmon-overview.json": overview, "actmon-layer.json": layer}


def _drop_nulls(value: object) -> object:
    """The SDK writes ``null`` for unset panel options; the Grafana schema wants them absent."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def render(name: str) -> str:
    """The dashboard JSON as written to ``dashboards/<name>``."""
    built = DASHBOARDS[name]().build()
    doc = _drop_nulls(json.loads(JSONEncoder(sort_keys=True, indent=2).encode(built)))
    assert isinstance(doc, dict)
    doc.pop("style", None)  # removed from Grafana's dashboard schema; the SDK still writes it
    for variable in doc.get("templating", {}).get("list", []):
        if variable.get("type") != "interval":  # SDK defaults outside the dashboard schema
            for key in ("auto", "auto_count", "auto_min", "id"):
                variable.pop(key, None)
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def panel_queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every panel target of a dashboard JSON document."""
    out = []
    for panel in doc.get("panels", []):
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or ["dashboards"])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        (out / name).write_text(render(name))
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
