"""``actmon gate`` behind the CLI: resolve thresholds, run the command if any, judge, report."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from actmon.config import ENV_VAR, load_config
from actmon.errors import ConfigError
from actmon.gate import Check, Thresholds, describe, evaluate, junit_xml, markdown
from actmon.store import RunStore, StoreError


def _parse_layer_limit(text: str) -> tuple[str, str, float]:
    try:
        glob, rest = text.split("=", 1)
        kind, value = rest.split(":", 1)
        limit = float(value)
    except ValueError:
        raise click.UsageError(
            f"--layer {text!r}: expected GLOB=KIND:MAX, e.g. 'encoder.*=dead:0.5'"
        ) from None
    if kind not in ("dead", "saturated") or not 0 <= limit <= 1:
        raise click.UsageError(
            f"--layer {text!r}: KIND must be dead or saturated and MAX within [0, 1]"
        )
    return glob, kind, limit


def run_gate(
    store_path: str | None,
    config_path: str | None,
    run_name: str | None,
    baseline: str | None,
    max_dead: float | None,
    max_saturated: float | None,
    no_nonfinite: bool | None,
    layer_limits: tuple[str, ...],
    junit: str | None,
    command: tuple[str, ...],
) -> int:
    console = Console(stderr=False, width=120)
    if bool(store_path) == bool(command):
        raise click.UsageError("give either --store PATH or a command after --, not both")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"actmon gate: {exc}", err=True)
        return 2
    g = config.gate
    per_layer = [
        (glob, kind, value)
        for glob, limits in g.per_layer.items()
        for kind, value in (("dead", limits.dead), ("saturated", limits.saturated))
        if value is not None
    ]
    per_layer = [_parse_layer_limit(t) for t in layer_limits] + per_layer
    thresholds = Thresholds(
        max_dead=max_dead if max_dead is not None else g.max_dead,
        max_saturated=max_saturated if max_saturated is not None else g.max_saturated,
        allow_nonfinite=(not no_nonfinite) if no_nonfinite is not None else g.allow_nonfinite,
        per_layer=tuple(per_layer),
        baseline_tolerance=g.baseline_tolerance,
    )
    if command:
        with tempfile.TemporaryDirectory(prefix="actmon-gate-") as tmp:
            path = Path(tmp) / "actmon.db"
            status = _run_command(command, config_path, path)
            if status != 0:
                click.echo(f"actmon gate: the command exited with status {status}", err=True)
                if not path.exists():
                    return 1
            return _judge(str(path), run_name, baseline, thresholds, junit, console)
    assert store_path is not None
    return _judge(store_path, run_name, baseline, thresholds, junit, console)


def _run_command(command: tuple[str, ...], config_path: str | None, store: Path) -> int:
    """Run the training command with ACTMON_CONFIG = the gate's config + a fresh store path."""
    data: dict[str, Any] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    sinks = data.setdefault("sinks", {})
    sinks["store"] = {**sinks.get("store", {}), "enabled": True, "path": str(store)}
    env_config = store.parent / "gate-config.yaml"
    env_config.write_text(yaml.safe_dump(data))
    env = {**os.environ, ENV_VAR: str(env_config)}
    return subprocess.run(list(command), env=env, check=False).returncode


def _judge(
    path: str,
    run_name: str | None,
    baseline: str | None,
    thresholds: Thresholds,
    junit: str | None,
    console: Console,
) -> int:
    try:
        with RunStore(path) as db:
            run = db.run(run_name).run
            base = RunStore(baseline) if baseline else None
            try:
                checks = evaluate(db, thresholds, base)
            finally:
                if base is not None:
                    base.close()
    except StoreError as exc:
        click.echo(f"actmon gate: {exc}", err=True)
        return 2
    failures = [c for c in checks if not c.passed]
    _print(console, run, checks, failures)
    if junit:
        junit_xml(checks, junit)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown(checks, run))
    return 1 if failures else 0


def _print(console: Console, run: str, checks: list[Check], failures: list[Check]) -> None:
    if not failures:
        console.print(f"actmon gate: {run} passed {len(checks)} checks")
        return
    table = Table(
        title=f"actmon gate: {run} failed {len(failures)} of {len(checks)} checks",
        title_justify="left",
    )
    for column in ("check", "layer", "value", "allowed", "step"):
        table.add_column(column)
    for c in failures:
        table.add_row(
            c.name, c.layer or "-", f"{c.value:.4g}", f"<= {c.threshold:.4g}", str(c.step)
        )
    console.print(table)
    for c in failures:
        console.print(f"FAIL {describe(c)}", markup=False)
