"""Console sink: the per-layer health table, rendered with rich.

Names (run, layers) and alert text come from the user's model and config, so they are passed to
rich as :class:`~rich.text.Text`, never as markup: ``[/]closing`` or ``exp[bold]1`` print as
written, and ``:smile:`` stays text.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from actmon.rules import Alert
from actmon.snapshot import LayerStats, Snapshot


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{100 * value:.1f}%" if pct else f"{value:.3g}"


def _health(layer: LayerStats) -> Text:
    """The layer's worst fraction (dead, dormant or saturated) as a coloured cell."""
    worst = max(
        (
            v
            for v in (layer.dead_fraction, layer.dormant_fraction, layer.saturation_fraction)
            if v is not None and not math.isnan(v)
        ),
        default=None,
    )
    text = _fmt(worst, pct=True)
    if layer.nonfinite_count:
        return Text(f"NaN/Inf {layer.nonfinite_count}", style="bold red")
    if worst is None:
        return Text(text)
    colour = "red" if worst > 0.5 else "yellow" if worst > 0.1 else "green"
    return Text(text, style=colour)


def render_table(snapshot: Snapshot, worst: int | None = None) -> Table:
    """A rich Table with one row per layer of the window (only the ``worst`` n if given)."""
    loss = _fmt(snapshot.loss)
    gnorm = _fmt(snapshot.grad_norm_total)
    table = Table(
        title=Text(
            f"actmon {snapshot.run}: steps {snapshot.window[0]}-{snapshot.window[1]},"
            f" loss {loss}, grad norm {gnorm}"
        ),
        title_justify="left",
    )
    for column in (
        "layer",
        "kind",
        "units",
        "calls",
        "mean",
        "std",
        "min",
        "max",
        "zero",
        "dead|sat",
        "|grad|",
        "|out grad|",
        "update",
    ):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    layers = list(snapshot.layers.values())
    if worst is not None:
        layers = sorted(layers, key=LayerStats.health_score, reverse=True)[:worst]
    else:  # forward order, with the layers holding NaN/Inf first
        layers = sorted(layers, key=lambda layer: layer.nonfinite_count == 0)
    for layer in layers:
        stale = layer.stale(snapshot.step)  # did not run in this window: its latest figures
        name = Text(layer.name)
        if stale:
            name.append(f" (step {layer.as_of_step})", style="dim")
        table.add_row(
            name,
            Text(layer.kind.value),
            str(layer.units or "-"),
            str(layer.calls),
            _fmt(layer.mean),
            _fmt(layer.std),
            _fmt(layer.min),
            _fmt(layer.max),
            _fmt(layer.zero_fraction, pct=True),
            _health(layer),
            _fmt(layer.grad_norm),
            _fmt(layer.output_grad_norm),
            _fmt(layer.update_ratio),
        )
    return table


class ConsoleSink:
    """Prints the health table every ``every`` windows (and the last one at close).

    ``worst`` limits each table to the n least healthy layers: the compact live view.
    """

    def __init__(
        self, every: int = 1, console: Console | None = None, worst: int | None = None
    ) -> None:
        if every < 1:
            raise ValueError(f"ConsoleSink every: got {every}, must be >= 1")
        self.every = every
        self.worst = worst
        self.console = console or Console()
        self._seen = 0
        self._active: dict[tuple[str, str | None], Alert] = {}
        self._last: Snapshot | None = None
        self._printed_last = False

    def write(self, snapshot: Snapshot) -> None:
        self._seen += 1
        self._last = snapshot
        self._printed_last = self._seen % self.every == 0
        if self._printed_last:
            self._print(snapshot)

    def _print(self, snapshot: Snapshot) -> None:
        if snapshot.layers:
            self.console.print(render_table(snapshot, self.worst))
        else:  # no monitored layer has run yet (never a header-only table)
            first, last = snapshot.window
            self.console.print(
                Text(
                    f"actmon {snapshot.run}: steps {first}-{last}, loss"
                    f" {_fmt(snapshot.loss)}, grad norm {_fmt(snapshot.grad_norm_total)}; no"
                    " monitored layer has run yet"
                )
            )
        for alert in self._active.values():
            self.console.print(Text(f"  active: {alert.short()}"))  # full text: when it fired

    def write_alert(self, alert: Alert) -> None:
        key = (alert.rule, alert.layer)
        if alert.state == "firing":
            self._active[key] = alert
        else:
            self._active.pop(key, None)
        colour = {"info": "cyan", "warning": "yellow", "critical": "bold red"}[alert.severity]
        colour = "green" if alert.state == "resolved" else colour
        self.console.print(Text.assemble(("actmon alert", colour), " ", alert.message()))

    def close(self) -> None:
        if self._last is not None and not self._printed_last:
            self._print(self._last)
        self._printed_last = True
