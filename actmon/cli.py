"""The ``actmon`` command line."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from actmon import __version__
from actmon.config import load_config
from actmon.errors import ConfigError


@click.group()
@click.version_option(__version__, prog_name="actmon")
def main() -> None:
    """actmon: activation health monitoring for PyTorch training."""


@main.command()
@click.option(
    "--scenario",
    default="glitch",
    show_default=True,
    type=click.Choice(["glitch", "healthy", "dying-relu", "saturation", "nan", "double-softmax"]),
    help="Which failure mode to show (glitch: an alert fires and resolves).",
)
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--log-every", default=25, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the run store, TensorBoard logs and report go.",
)
@click.option("--serve", is_flag=True, help="Keep the Prometheus endpoint up until Ctrl-C.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="An actmon YAML config to run the demo with.",
)
def demo(
    scenario: str, steps: int, log_every: int, out: str, serve: bool, config_path: str | None
) -> None:
    """Train on scikit-learn's digits with every sink on, then write the HTML report."""
    from rich.console import Console

    from actmon.demo import run_demo

    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs keep whole rows
    try:
        run_demo(
            steps=steps,
            log_every=log_every,
            config=config_path,
            console=console,
            out=out,
            scenario=scenario,
            serve=serve,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def config() -> None:
    """Work with actmon config files."""


@config.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
def validate(path: str) -> None:
    """Check a config file; print the effective config or the errors (exit 1)."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(f"{path}: valid")
    click.echo(cfg.model_dump_json(indent=2))


@main.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False),
    help="The run store to judge (omit when running a command after --).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="An actmon config: its gate: section, and for a command its whole config.",
)
@click.option("--run", "run_name", help="The run to judge when the store holds several.")
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False),
    help="A good run's store: fail when a layer got worse than it by the tolerance.",
)
@click.option("--max-dead", type=click.FloatRange(0, 1), help="Largest dead_fraction allowed.")
@click.option(
    "--max-saturated", type=click.FloatRange(0, 1), help="Largest saturation_fraction allowed."
)
@click.option(
    "--no-nonfinite/--allow-nonfinite",
    "no_nonfinite",
    default=None,
    help="Fail on any NaN/Inf in the run (the default), or allow them.",
)
@click.option(
    "--layer",
    "layer_limits",
    multiple=True,
    metavar="GLOB=KIND:MAX",
    help="Per-layer limit, e.g. 'encoder.*=dead:0.5' (KIND: dead or saturated).",
)
@click.option(
    "--allow-unfinished/--no-allow-unfinished",
    "allow_unfinished",
    default=None,
    help="Accept a run left 'running' or 'terminated' (default: it fails the gate).",
)
@click.option(
    "--fail-on",
    type=click.Choice(["critical", "warning", "info", "none"]),
    help="Fail when any alert of this severity or above fired [default: critical].",
)
@click.option(
    "--keep-store",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Command mode: keep the run store in DIR (default: a new runs/gate-<UTC time>/).",
)
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def gate(**options: Any) -> None:
    """Judge a run's health for CI: exit 0 when healthy, non-zero when not.

    \b
    actmon gate --store runs/x/actmon.db [--config configs/ci-gate.yaml]
    actmon gate --config configs/ci-gate.yaml -- python train.py ...

    A run fails when it did not finish (status failed, terminated or running), when a
    layer's final window crosses a limit (or its baseline), on vanishing or exploding
    gradients, on any NaN/Inf, and on any alert of --fail-on's severity or above.

    \b
    Exit codes:
      0  healthy: every check passed
      1  unhealthy: a check failed (the failures are printed)
      2  usage, config or store error (nothing judged)
      3  the command after -- failed (non-zero exit or killed); its checks are
         still printed when it left a store
    """
    from actmon.gate_cli import run_gate

    sys.exit(run_gate(**options))


@main.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    default="report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The HTML file to write.",
)
@click.option("--run", "run_name", help="The run to report when the store holds several.")
@click.option(
    "--max-heatmaps",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    help="Layers with a histogram heatmap, least healthy first (0: every layer).",
)
def report(store: str, output: str, run_name: str | None, max_heatmaps: int) -> None:
    """Write a self-contained HTML report (plots inlined) of a run store."""
    from actmon.report import ReportError, write_report
    from actmon.store import StoreError

    try:
        path = write_report(store, output, run_name, max_heatmaps=max_heatmaps)
    except (StoreError, ReportError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path}")


@main.group()
def rules() -> None:
    """Work with alert rules."""


def _grafana_url(value: str) -> str:
    """An http(s) URL with nothing a Prometheus template would read as markup."""
    if not re.fullmatch(r"https?://[^\s{}]+", value):
        raise click.BadParameter(
            f"{value!r} is not an http:// or https:// URL without spaces or braces",
            param_hint="--grafana-url",
        )
    return value


@rules.command("export")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="The actmon config whose rules to export (default: the built-in pack).",
)
@click.option(
    "--step-seconds",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds per training step: turns for_steps into Prometheus 'for:'.",
)
@click.option(
    "--scrape-interval",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Prometheus scrape interval in seconds: the shortest 'for:'.",
)
@click.option(
    "--grafana-url",
    default="http://localhost:3000",
    show_default=True,
    callback=lambda _ctx, _param, value: _grafana_url(value),
    help="Grafana's base URL, for each alert's 'dashboard' link (run and layer preselected).",
)
def export(
    config_path: str | None, step_seconds: float, scrape_interval: float, grafana_url: str
) -> None:
    """Print the rules as a Prometheus alerting-rules file; skipped rules go to stderr."""
    from actmon.rules_export import export_yaml

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    text, skipped = export_yaml(cfg, step_seconds, scrape_interval, grafana_url)
    click.echo(text, nl=False)
    for name, reason in skipped:
        click.echo(f"skipped {name}: {reason}", err=True)


if __name__ == "__main__":
    main()
