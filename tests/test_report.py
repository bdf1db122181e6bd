"""The HTML report: what every plot shows (read from the figures the report draws), rankings
and runbook hints from the rule pack, crafted stores (XSS payloads, mathtext names, wrong JSON
shapes) rendered in headless Chromium, and the refusal to write over the store."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.figure import Figure
from matplotlib.text import Text
from torch import nn

import actmon
from actmon.cli import main
from actmon.report import ReportError, plots, write_report
from actmon.rules import DEFAULT_RULES
from tests.test_monitor import NaNAt

RUNBOOK = {r.name: r.runbook for r in DEFAULT_RULES}


def _train(path: Path, model: nn.Module, steps: int, log_every: int, run: str) -> Path:
    """Forward/backward on random inputs without optimizer updates (a NaN stays in its step).
    Seeded here: module-scoped fixtures run before the per-test seed."""
    torch.manual_seed(0)
    sinks = {"store": {"enabled": True, "path": str(path)}, "console": {"enabled": False}}
    with actmon.watch(
        model, log_every=log_every, sample_every=1, run_name=run, sinks=sinks
    ) as monitor:
        for _ in range(steps):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            loss.backward()
            model.zero_grad()
            monitor.step(loss=loss)
    return path


@pytest.fixture(scope="module")
def _sick_master(tmp_path_factory) -> Path:
    """24 steps in windows of 4; NaN/Inf out of layer '4' at step 13 (the window 13-16)."""
    torch.manual_seed(0)  # module scope: runs before the per-test seed
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), NaNAt(step=13),
        nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 2),
    )  # fmt: skip
    with torch.no_grad():
        model[2].bias.fill_(-0.3)  # some of layer 3's units die
    return _train(tmp_path_factory.mktemp("sick") / "sick.db", model, 24, 4, "sick")


@pytest.fixture
def sick(_sick_master, tmp_path) -> Path:
    """A copy of the sick run's store, the test's own to change."""
    return Path(shutil.copy(_sick_master, tmp_path / "sick.db"))


@pytest.fixture(scope="module")
def sick_report(_sick_master, tmp_path_factory) -> tuple[Path, str, list[Figure]]:
    """The sick run's store, its report, and every figure drawn for it (in page order)."""
    drawn: list[Figure] = []
    real = plots.png

    def record(fig: Figure) -> str:
        drawn.append(fig)
        return real(fig)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "png", record)
        page = write_report(_sick_master, tmp_path_factory.mktemp("report") / "r.html")
    return _sick_master, page.read_text(), drawn


@pytest.fixture
def healthy(tmp_path) -> Path:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    return _train(tmp_path / "healthy.db", model, 12, 4, "healthy")


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    """Every figure the report draws, in page order."""
    drawn: list[Figure] = []
    real = plots.png

    def record(fig: Figure) -> str:
        drawn.append(fig)
        return real(fig)

    monkeypatch.setattr(plots, "png", record)
    return drawn


def _time_axes(figs: list[Figure]):
    return [ax for fig in figs for ax in fig.axes if ax.get_xlabel() == "step"]


def _shaded(ax) -> list[tuple[float, float]]:
    spans = []
    for patch in ax.patches:
        if patch.get_hatch() == "//":
            box = patch.get_bbox()
            spans.append((box.x0, box.x1))
    return spans


def _expected_nonfinite(store: Path) -> list[tuple[int, int]]:
    """Independently of the report: windows whose NaN/Inf count is positive or whose loss or
    total gradient norm is not finite (SQLite keeps NaN as NULL)."""
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT DISTINCT w.first_step - 1, w.last_step FROM windows w JOIN metrics m"
            " ON m.run = w.run AND m.step = w.step WHERE m.layer = '' AND ("
            " (m.metric = 'nonfinite_count' AND m.value > 0) OR"
            " (m.metric IN ('loss', 'grad_norm_total') AND (m.value IS NULL OR"
            " abs(m.value) > 1e308))) ORDER BY 1"
        ).fetchall()
    return [(int(a), int(b)) for a, b in rows]


def _series(store: Path, metric: str, layer: str = "") -> tuple[list[int], list[float]]:
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT step, value FROM metrics WHERE metric = ? AND layer = ? ORDER BY step",
            (metric, layer),
        ).fetchall()
    return [int(s) for s, _ in rows], [math.nan if v is None else float(v) for _, v in rows]


class _Table(HTMLParser):
    """Rows of cell texts of the first table in the fed HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._depth = 0
        self._cell: list[str] | None = None
        self._done = False

    def handle_starttag(self, tag, attrs):
        if self._done:
            return
        if tag == "table":
            self._depth += 1
        elif tag == "tr" and self._depth:
            self.rows.append([])
        elif tag in ("td", "th") and self._depth:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table" and self._depth:
            self._done = True

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _table_after(page: str, heading: str) -> list[list[str]]:
    parser = _Table()
    parser.feed(page.split(f"<h2>{heading}</h2>", 1)[1])
    return parser.rows


def test_loss_and_gradient_norm_plotted_from_the_store(sick_report):
    sick, _, figures = sick_report
    curves = figures[0]
    loss_ax, norm_ax = curves.axes
    assert loss_ax.get_title().startswith("Loss")
    assert norm_ax.get_title().startswith("Total gradient norm")
    steps, loss = _series(sick, "loss")
    line = loss_ax.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), loss, equal_nan=True)
    assert math.isnan(loss[steps.index(16)])  # the NaN window is a gap, not a point
    _, norm = _series(sick, "grad_norm_total")
    _, norm_max = _series(sick, "grad_norm_total_max")
    norm_lines = norm_ax.get_lines()
    np.testing.assert_allclose(norm_lines[0].get_ydata(), norm, equal_nan=True)
    np.testing.assert_allclose(norm_lines[1].get_ydata(), norm_max, equal_nan=True)
    for ax in (loss_ax, norm_ax):
        assert ax.get_ylabel()


@pytest.mark.parametrize(
    ("values", "scale"),
    [
        ([1000.0, 30.0, 2.0, 0.5], "log"),  # over two decades, all positive
        ([3.0, 1.0, 0.05], "linear"),  # under two decades
        ([1000.0, -1.0, 0.001], "linear"),  # a negative loss: no log axis
    ],
)
def test_log_scale_only_where_it_helps(values, scale):
    points = list(enumerate(values, start=1))
    fig = plots.run_curves(points, points, [], (0, len(values)), [])
    assert fig is not None
    assert [ax.get_yscale() for ax in fig.axes] == [scale, scale]
    if scale == "log":
        assert fig.axes[0].get_ylabel().endswith("(log scale)")


def test_nonfinite_windows_shaded_on_every_time_axis_and_axes_span_the_run(sick_report):
    sick, page, figures = sick_report
    expected = _expected_nonfinite(sick)
    assert expected == [(12, 16)]
    axes = _time_axes(figures)
    titles = [ax.get_title() for ax in axes]
    # loss, grad norm, alert timeline, dead and saturation fractions, a heatmap per layer
    assert len(axes) == 2 + 1 + 2 + 8, titles
    for ax in axes:
        assert _shaded(ax) == [pytest.approx(span) for span in expected], ax.get_title()
        assert ax.get_xlim() == (0.0, 24.0), ax.get_title()  # the whole run, alerts included
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 24]
        assert all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
        gaps = set(np.diff(ticks))
        assert len(gaps) == 1, (ax.get_title(), ticks)  # evenly spaced
        gap = gaps.pop()
        assert gap / 10 ** math.floor(math.log10(gap)) in (1, 2, 5)  # 1/2/5 x 10^k
    assert "windows with NaN/Inf values" in page


def test_heatmap_ticks_are_round_values_with_zero_for_relu(sick_report):
    _, _, figures = sick_report
    heatmaps = {
        ax.get_title().split(" ")[0]: ax
        for fig in figures
        for ax in fig.axes
        if "activation distribution" in ax.get_title()
    }
    readable = re.compile(r"^-?(0|\d+(\.\d+)?|0\.\d+|\d(\.\d+)?e-?\d+)$")
    for name, ax in heatmaps.items():
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels, name
        for label in labels:
            assert readable.match(label), (name, label)
            value = float(label)
            assert (
                value == 0
                or math.isclose(abs(value), 10 ** round(math.log10(abs(value))), rel_tol=1e-9)
                or heatmaps[name].get_title().startswith("6 (tanh)")
            ), (name, label)
        assert ax.get_ylabel() == "activation value"
    relu = [t.get_text() for t in heatmaps["1"].get_yticklabels()]
    assert relu[0] == "0"  # the zero bin, not its lower edge -5.96e-08
    assert not any(label.startswith("-") for label in relu)
    tanh = [float(t.get_text()) for t in heatmaps["6"].get_yticklabels()]
    assert all(abs(v) <= 1 for v in tanh)


def test_flat_zero_fraction_is_drawn_on_a_percent_axis_from_zero():
    fig = plots.fraction_curves({"1": [(4, 0.0), (8, 0.0), (12, 0.0)]}, "Dead", (0, 12), [])
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 0.1)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["0%", "2%", "4%", "6%", "8%", "10%"]


def test_worst_layers_rank_nonfinite_first_with_a_runbook_for_every_row(sick_report):
    sick, page, _ = sick_report
    rows = _table_after(page, "Worst layers")
    header, body = rows[0], rows[1:]
    assert header == ["layer", "kind", "NaN/Inf values", "metric", "worst (step)", "final",
                      "runbook"]  # fmt: skip
    with sqlite3.connect(sick) as db:
        nonfinite = {
            layer
            for (layer,) in db.execute(
                "SELECT DISTINCT layer FROM metrics WHERE layer != '' AND value > 0 AND metric IN"
                " ('nan_count', 'posinf_count', 'neginf_count', 'output_grad_nan_count',"
                " 'output_grad_inf_count')"
            )
        }
    # The NaN/Inf out of layer '4' runs forward through 5-7 and back in the output gradients
    # as far as ReLU 3's live units let it. Those layers first; among them the health score's
    # second key, the worst fraction: relu layer 3 (a negative bias kills units) first, then
    # forward order; then the layers without NaN/Inf by their worst fraction.
    names = [r[0] for r in body]
    assert {"3", "4", "5", "6", "7"} <= nonfinite
    assert names[: len(nonfinite)] == ["3", *sorted(nonfinite - {"3"}, key=int)]
    # Without NaN/Inf only layers with a health fraction are listed: relu 1 (linear ones not).
    assert names[len(nonfinite) :] == ([] if "1" in nonfinite else ["1"])
    for row in body:
        if row[0] in nonfinite:
            assert row[2].endswith(" in 1 window (first in steps 13-16)"), row
            assert row[6] == RUNBOOK["nonfinite"], row  # the hint for what ranks the layer
        else:
            assert row[2] == "-"
            assert row[6], row
    steps, dead = _series(sick, "dead_fraction", "3")
    finite = [(v, s) for s, v in zip(steps, dead, strict=True) if not math.isnan(v)]
    peak = max(v for v, _ in finite)
    at = min(s for v, s in finite if v == peak)
    assert body[0][3:6] == ["dead_fraction", f"{peak:.3f} (step {at})", f"{dead[-1]:.3f}"]
    assert peak > 0.3  # higher than any other layer's fraction


def test_worst_layers_hint_without_an_alert_comes_from_the_rule_pack(healthy, tmp_path):
    page = write_report(healthy, tmp_path / "r.html").read_text()
    rows = _table_after(page, "Worst layers")[1:]
    with sqlite3.connect(healthy) as db:
        assert db.execute("SELECT count(*) FROM alerts").fetchone() == (0,)
    assert [r[:4] for r in rows] == [["1", "relu", "-", "dead_fraction"]]
    value = float(rows[0][4].split(" ")[0])
    assert value < 0.1  # no dead-unit rule crossed: the first to fire as it grows
    assert rows[0][6] == RUNBOOK["dead_units_concerning"]


def test_runbook_hints_follow_the_runs_own_rule_pack(tmp_path):
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # every unit dead
    rules = [
        {"name": "mine", "metric": "dead_fraction", "op": ">", "threshold": 0.9,
         "runbook": "My own advice."},
    ]  # fmt: skip
    sinks = {"store": {"enabled": True, "path": str(tmp_path / "s.db")}}
    with actmon.watch(model, log_every=2, sinks=sinks, rules=rules, run_name="own") as monitor:
        for _ in range(2):
            model(torch.randn(4, 6)).sum().backward()
            monitor.step()
    page = write_report(tmp_path / "s.db", tmp_path / "r.html").read_text()
    rows = _table_after(page, "Worst layers")
    assert rows[1][0] == "1"
    assert rows[1][6] == "My own advice."


def test_heatmap_cap_is_stated_with_how_to_raise_it(tmp_path):
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(6, 6), nn.ReLU())])
    store = _train(tmp_path / "s.db", model, 4, 2, "wide")
    capped = write_report(store, tmp_path / "a.html", max_heatmaps=3).read_text()
    section = capped.split("Activation distributions over time")[1].split("<h2>")[0]
    assert section.count("<h3>") == 3
    assert "Showing 3 of 10 layers" in section
    assert "--max-heatmaps N" in section
    everything = write_report(store, tmp_path / "b.html", max_heatmaps=0).read_text()
    section = everything.split("Activation distributions over time")[1].split("<h2>")[0]
    assert section.count("<h3>") == 10
    assert "Showing" not in section
    result = CliRunner().invoke(
        main, ["report", str(store), "-o", str(tmp_path / "c.html"), "--max-heatmaps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.html").read_text().count("<h3>") == 2
    with pytest.raises(ReportError, match=r"max_heatmaps: got -1, must be an integer >= 0"):
        write_report(store, tmp_path / "d.html", max_heatmaps=-1)


def test_headings_carry_the_layer_kind(sick_report):
    _, page, _ = sick_report
    assert "<h3>1 <span class='kind'>(relu)</span></h3>" in page
    assert "<h3>6 <span class='kind'>(tanh)</span></h3>" in page


def test_gradient_by_depth_has_readable_labels_and_axis_titles(sick_report):
    _, _, figures = sick_report
    ax = next(ax for fig in figures for ax in fig.axes if "by depth" in ax.get_title())
    assert ax.get_xlabel().startswith("parameter-gradient L2 norm")
    assert ax.get_ylabel() == "layer (forward order, input at the top)"
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels] == ["0 (linear)", "2 (linear)", "5 (linear)",
                                              "7 (linear)"]  # fmt: skip
    assert all(t.get_rotation() == 0 and t.get_fontsize() >= 9 for t in labels)


# ---- rendering in Chromium -------------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian package; .ci/run installs it)")
    return path


def _chrome(page: Path, tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",  # let load handlers and failed images run
            f"--user-data-dir={tmp_path / 'chrome'}",
            *args,
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        self._in_title = False


def _dom(page: Path, tmp_path: Path) -> _Dom:
    dom = _Dom()
    dom.feed(_chrome(page, tmp_path, "--dump-dom"))
    return dom


def _pictures(page_text: str) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for alt, data in re.findall(
        r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page_text
    ):
        out[alt] = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"))
    return out


def test_sick_and_healthy_reports_render_in_chromium_with_their_plots(sick, healthy, tmp_path):
    for store, plots_expected in (
        (
            sick,
            ["loss and total gradient norm", "alert timeline", "Dead fraction (ReLU family)",
             "Saturation fraction (sigmoid / tanh / clipping)", "1 heatmap", "4 heatmap",
             "gradient norm by depth"],
        ),
        (healthy, ["loss and total gradient norm", "Dead fraction (ReLU family)", "1 heatmap",
                   "gradient norm by depth"]),
    ):  # fmt: skip
        page = write_report(store, tmp_path / f"{store.stem}.html")
        text = page.read_text()
        pictures = _pictures(text)
        for alt in plots_expected:
            assert alt in pictures, (store.stem, alt, list(pictures))
            pixels = pictures[alt]
            assert pixels.shape[0] > 100
            assert pixels.shape[1] > 300
            assert (pixels < 200).mean() > 0.01  # lines, text and axes drawn
        dom = _dom(page, tmp_path)
        assert dom.title == f"actmon report: {store.stem}"
        images = [a for t, a in dom.tags if t == "img"]
        assert len(images) == len(pictures)  # every plot reached the rendered page
        png = tmp_path / f"{store.stem}.png"
        _chrome(page, tmp_path, f"--screenshot={png}", "--window-size=1200,3000")
        from PIL import Image

        shot = np.asarray(Image.open(png).convert("L"))
        assert (shot < 250).mean() > 0.05  # a real share of the page is drawn on
    assert "No alert fired." in (tmp_path / "healthy.html").read_text()


XSS = (
    '<script>document.title="XSS-RAN"</script>',
    '\'"><img src=x onerror=document.title="XSS-RAN">',
)


def _poison(store: Path, payload: str) -> None:
    """Put ``payload`` in every text field the store holds (the run name, its status, layer
    names and kinds in both layer lists, every alert column, the rule pack's texts)."""
    with sqlite3.connect(store) as db:
        for table in ("runs", "layers", "windows", "metrics", "histogram_edges", "histograms",
                      "alerts"):  # fmt: skip
            db.execute(f"UPDATE {table} SET run = ?", (payload,))
        layer = payload + "L"
        for table in ("metrics", "histogram_edges", "histograms", "alerts"):
            db.execute(f"UPDATE {table} SET layer = ? WHERE layer = '3'", (layer,))
        db.execute("UPDATE layers SET name = ?, kind = ? WHERE name = '3'", (layer, payload))
        (model_json, config_json) = db.execute(
            "SELECT model_json, config_json FROM runs"
        ).fetchone()
        model = json.loads(model_json)
        for item in model:
            if item["name"] in ("1", "3"):
                item["kind"] = payload
            if item["name"] == "3":
                item["name"] = layer
        config = json.loads(config_json)
        for rule in config["rules"]:
            rule["runbook"] = rule["summary"] = payload
        db.execute(
            "UPDATE runs SET status = ?, model_json = ?, config_json = ?",
            (payload, json.dumps(model), json.dumps(config)),
        )
        columns = ("rule", "layer", "severity", "state", "metric", "op", "summary", "runbook")
        for column in columns:
            db.execute(
                "INSERT INTO alerts SELECT run, step, rule, layer, severity, 'firing', metric,"
                " value, op, threshold, first_seen, summary, runbook FROM alerts LIMIT 1"
            )
            db.execute(
                f"UPDATE alerts SET {column} = ? WHERE rowid = last_insert_rowid()",
                (payload,),
            )


@pytest.mark.parametrize("payload", XSS, ids=["script", "onerror"])
def test_crafted_store_runs_no_script_in_chromium(sick, tmp_path, payload):
    _poison(sick, payload)
    page = write_report(sick, tmp_path / "r.html")
    text = page.read_text()
    assert payload not in text  # escaped wherever it was written
    dom = _dom(page, tmp_path)
    assert dom.title == f"actmon report: {payload}"  # the title is the text, unchanged
    assert "XSS-RAN" not in (dom.title.replace(payload, ""))
    assert not [t for t, _ in dom.tags if t == "script"]
    handlers = [(t, k) for t, attrs in dom.tags for k in attrs if k.startswith("on")]
    assert handlers == []
    images = [a.get("src", "") for t, a in dom.tags if t == "img"]
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert text.count(html_escape(payload)) >= 10  # the payload is shown, as text


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# ---- crashes ----------------------------------------------------------------------------------


class _Named(nn.Module):
    """Layers whose names matplotlib would read as mathtext (one does not even parse)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("$\\frac{1}{$", nn.Linear(6, 6))
        self.add_module("$x^2$", nn.ReLU())
        self.add_module("out", nn.Linear(6, 2))

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


def test_mathtext_layer_names_are_drawn_literally(tmp_path, figures):
    store = _train(tmp_path / "s.db", _Named(), 4, 2, "$E=mc^2$")
    page = write_report(store, tmp_path / "r.html").read_text()
    assert "<h3>$x^2$ <span class='kind'>(relu)</span></h3>" in page
    texts = [t for fig in figures for t in fig.findobj(Text)]
    shown = []
    for t in texts:
        raw = t.get_text()
        if "frac" in raw or "x^2" in raw:
            # What matplotlib will draw: the plain string with the dollars, not a formula.
            drawn, is_math = t._preprocess_math(raw)
            assert not is_math, raw
            shown.append(drawn)
    assert "$x^2$" in shown
    assert any("$\\frac{1}{$" in s for s in shown)
    for fig in figures:
        fig.canvas.draw()  # nothing left that mathtext would fail to parse


@pytest.mark.parametrize(
    "model_json",
    ['{"a": 1}', "[1, 2]", '"layers"', "null", '[{"name": 5}, {"kind": "relu"}]', "{}"],
)
def test_wrong_model_json_shapes_render_with_a_note(healthy, tmp_path, model_json):
    with sqlite3.connect(healthy) as db:
        db.execute("UPDATE runs SET model_json = ?", (model_json,))
    page = write_report(healthy, tmp_path / "r.html").read_text()
    if model_json not in ("null", "{}"):
        assert "Parts of this store were unusable" in page
        assert "model_json" in page
    assert "Worst layers" in page
    assert "1 heatmap" in page  # layers taken from the stored metrics


@pytest.mark.parametrize("config_json", ['{"rules": 5}', "[]", '{"rules": [{"name": 1}]}'])
def test_wrong_config_shapes_fall_back_to_the_default_rule_pack(healthy, tmp_path, config_json):
    with sqlite3.connect(healthy) as db:
        db.execute("UPDATE runs SET config_json = ?", (config_json,))
    page = write_report(healthy, tmp_path / "r.html").read_text()
    assert "rule pack could not be read: runbook hints are the default pack" in page
    assert RUNBOOK["dead_units_concerning"] in page


def test_output_over_the_store_is_refused(healthy, tmp_path, monkeypatch):
    before = healthy.read_bytes()
    link = tmp_path / "link.db"
    link.symlink_to(healthy)
    hard = tmp_path / "hard.db"
    hard.hardlink_to(healthy)
    monkeypatch.chdir(tmp_path)
    for out in (healthy, link, Path("healthy.db"), Path("./sub/../healthy.db"), hard,
                Path("healthy.db-wal")):  # fmt: skip
        with pytest.raises(ReportError, match=r"is the run store .* being reported"):
            write_report("healthy.db", out)
    result = CliRunner().invoke(main, ["report", "healthy.db", "-o", "healthy.db"])
    assert result.exit_code == 1
    assert "writing the HTML there would destroy the store" in result.output
    result = CliRunner().invoke(main, ["report", "link.db", "-o", "./healthy.db"])
    assert result.exit_code == 1
    assert healthy.read_bytes() == before
    assert actmon.store.open(healthy).run().run == "healthy"


def test_a_run_without_windows_renders_saying_so(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    store = _train(tmp_path / "s.db", model, 0, 4, "empty")
    page = write_report(store, tmp_path / "r.html").read_text()
    assert "No window was recorded: no step ended in this run." in page
    assert "No layer has a dead, dormant or saturation figure." in page
    assert "<img" not in page


def test_health_plots_show_the_ten_highest_layers_and_say_so(tmp_path, figures):
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(6, 6), nn.ReLU())])
    with torch.no_grad():
        for i in range(12):  # layer 2i+1 has i of its 6 units' biases far negative (dead)
            model[2 * i].bias[: min(i, 6)] = -100.0
    store = _train(tmp_path / "s.db", model, 4, 2, "many")
    write_report(store, tmp_path / "r.html", max_heatmaps=1)
    ax = next(ax for fig in figures for ax in fig.axes if ax.get_title().startswith("Dead"))
    assert ax.get_title() == "Dead fraction (ReLU family): the 10 highest of 12 layers"
    labels = [line.get_label() for line in ax.get_lines()]
    assert len(labels) == 10
    assert "1" not in labels  # layer 1 (no dead unit) is left out
    with sqlite3.connect(store) as db:
        peaks = dict(
            db.execute(
                "SELECT layer, max(value) FROM metrics WHERE metric = 'dead_fraction'"
                " GROUP BY layer"
            ).fetchall()
        )
    assert min(peaks[name] for name in labels) >= max(
        v for name, v in peaks.items() if name not in labels
    )
