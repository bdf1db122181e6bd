"""The ``actmon`` command line."""

from __future__ import annotations

import sys

import click

from actmon import __version__
from actmon.config import load_config
from actmon.errors import ConfigError


@click.group()
@click.version_option(__version__, prog_name="actmon")
def main() -> None:
    """actmon: activation health monitoring for PyTorch training."""


@main.command()
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--log-every", default=50, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="An actmon YAML config to run the demo with.",
)
def demo(steps: int, log_every: int, config_path: str | None) -> None:
    """Train a small MLP on scikit-learn's digits with the monitor attached."""
    from rich.console import Console

    from actmon.demo import run_demo

    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs keep whole rows
    try:
        run_demo(steps=steps, log_every=log_every, config=config_path, console=console)
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


if __name__ == "__main__":
    main()
