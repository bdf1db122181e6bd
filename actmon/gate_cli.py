"""``actmon gate`` behind the CLI: resolve thresholds, run the command if any, judge, report.

Exit codes are :data:`actmon.gate.EXIT_CODES`: 0 healthy, 1 unhealthy, 2 usage/config/store
error, 3 the command itself failed (its checks are still printed when it left a store).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from actmon.config import ENV_VAR, load_config
from actmon.errors import ConfigError
from actmon.gate import (
    COMMAND_FAILED,
    PASSED,
    UNHEALTHY,
    USAGE_ERROR,
    Check,
    Thresholds,
    command_check,
    describe,
    evaluate,
    junit_xml,
    markdown,
    summary_line,
)
from actmon.store import RunStore, StoreError

STORE_FILE = "actmon.db"


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
    allow_unfinished: bool | None = None,
    fail_on: str | None = None,
    keep_store: str | None = None,
) -> int:
    console = Console(stderr=False, width=120)
    if store_path and command:
        raise click.UsageError("give --store PATH or a command after --, not both")
    if not store_path and not command:
        raise click.UsageError(
            "nothing to judge: give --store PATH (a run store) or the training command after --"
            " (e.g. actmon gate -- python train.py)"
        )
    if keep_store and not command:
        raise click.UsageError("--keep-store is for a command after --; --store names a store")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"actmon gate: {exc}", err=True)
        return USAGE_ERROR
    g = config.gate
    per_layer = [
        (glob, kind, value)
        for glob, limits in g.per_layer.items()
        for kind, value in (("dead", limits.dead), ("saturated", limits.saturated))
        if value is not None
    ]
    per_layer = [_parse_layer_limit(t) for t in layer_limits] + per_layer
    severity = fail_on if fail_on is not None else g.fail_on
    thresholds = Thresholds(
        max_dead=max_dead if max_dead is not None else g.max_dead,
        max_saturated=max_saturated if max_saturated is not None else g.max_saturated,
        allow_nonfinite=(not no_nonfinite) if no_nonfinite is not None else g.allow_nonfinite,
        per_layer=tuple(per_layer),
        baseline_tolerance=g.baseline_tolerance,
        allow_unfinished=allow_unfinished if allow_unfinished is not None else g.allow_unfinished,
        fail_on=None if severity == "none" else severity,
        min_grad_depth_ratio=g.min_grad_depth_ratio,
        max_grad_spike=g.max_grad_spike,
    )
    if command:
        return _gate_command(
            command, config_path, keep_store, run_name, baseline, thresholds, junit, console
        )
    assert store_path is not None
    return _judge(store_path, run_name, baseline, thresholds, junit, console)


def _store_dir(keep_store: str | None) -> Path:
    """Where command mode keeps the store: ``--keep-store DIR``, else a new ``runs/gate-<UTC>``."""
    if keep_store:
        return Path(keep_store)
    stamp = datetime.now(timezone.utc).strftime("gate-%Y%m%d-%H%M%S")
    path, n = Path("runs") / stamp, 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{stamp}-{n}"
    return path


def _gate_command(
    command: tuple[str, ...],
    config_path: str | None,
    keep_store: str | None,
    run_name: str | None,
    baseline: str | None,
    thresholds: Thresholds,
    junit: str | None,
    console: Console,
) -> int:
    """Run the training command on a kept store, then judge the run(s) it wrote."""
    directory = _store_dir(keep_store)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / STORE_FILE
        env_config = _command_config(config_path, directory)
    except (OSError, yaml.YAMLError) as exc:
        click.echo(
            f"actmon gate: cannot prepare the store directory {str(directory)!r}: {exc}", err=True
        )
        return USAGE_ERROR
    started = time.time()
    error = ""
    try:
        status: int | None = subprocess.run(
            list(command), env={**os.environ, ENV_VAR: str(env_config)}, check=False
        ).returncode
    except OSError as exc:  # not found, not executable
        status, error = None, f"cannot run {shlex.join(command)!r}: {exc.strerror or exc}"
    ran = command_check(status, error)
    if status is not None and status < 0:
        ran = command_check(status, f"the command was killed by {_signal_name(-status)}")
    if not ran.passed:
        click.echo(f"actmon gate: {describe(ran)}", err=True)
    if not path.exists():
        if ran.passed:
            click.echo(
                f"actmon gate: the command wrote no run store (expected at {str(path)!r}): the"
                " script must call actmon.watch(...) (or use the Lightning / Hugging Face"
                " ActmonCallback) with the store sink on; the gate passes it the store path"
                f" through ${ENV_VAR}",
                err=True,
            )
            ran = Check(
                "run store", None, "store", 0.0, 0.0, None, False, text=f"no run store at {path}"
            )
        if junit:
            junit_xml([ran], junit)
        return COMMAND_FAILED if status != 0 else USAGE_ERROR
    name = run_name
    if name is None:
        found = _new_run(path, started)
        if isinstance(found, int):
            if junit:
                junit_xml([ran], junit)
            return found if ran.passed else COMMAND_FAILED
        name = found
    code = _judge(str(path), name, baseline, thresholds, junit, console, first=[ran])
    report = shlex.quote(str(directory / "report.html"))
    console.print(
        Text(
            f"run store kept at {path}; read it with: actmon report {shlex.quote(str(path))}"
            f" -o {report}"
        ),
        soft_wrap=True,
    )
    return COMMAND_FAILED if not ran.passed else code


def _new_run(path: Path, started: float) -> str | int:
    """The run the command wrote (started after it); an exit code when that is not one run."""
    try:
        with RunStore(path) as db:
            runs = [info for info in db.runs() if info.started >= started - 1.0]
    except StoreError as exc:
        click.echo(f"actmon gate: {exc}", err=True)
        return USAGE_ERROR
    if len(runs) == 1:
        return runs[0].run
    if not runs:
        click.echo(
            f"actmon gate: {str(path)!r} holds no run started by this command: the script must"
            " call actmon.watch(...) (or use the Lightning / Hugging Face ActmonCallback)",
            err=True,
        )
    else:
        names = ", ".join(repr(info.run) for info in runs)
        click.echo(
            f"actmon gate: the command wrote {len(runs)} runs ({names}); name one with --run",
            err=True,
        )
    return USAGE_ERROR


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _command_config(config_path: str | None, directory: Path) -> Path:
    """The gate's config plus the kept store path, written for ``$ACTMON_CONFIG``."""
    data: dict[str, Any] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    sinks = data.setdefault("sinks", {})
    store = (directory / STORE_FILE).resolve()
    sinks["store"] = {**sinks.get("store", {}), "enabled": True, "path": str(store)}
    env_config = directory / "gate-config.yaml"
    env_config.write_text(yaml.safe_dump(data))
    return env_config.resolve()


def _judge(
    path: str,
    run_name: str | None,
    baseline: str | None,
    thresholds: Thresholds,
    junit: str | None,
    console: Console,
    first: tuple[Check, ...] | list[Check] = (),
) -> int:
    try:
        with RunStore(path) as db:
            run = db.run(run_name).run
            base = RunStore(baseline) if baseline else None
            try:
                checks = [*first, *evaluate(db, thresholds, base, run)]
            finally:
                if base is not None:
                    base.close()
    except StoreError as exc:
        click.echo(f"actmon gate: {exc}", err=True)
        return USAGE_ERROR
    failures = [c for c in checks if not c.passed]
    _print(console, run, checks, failures)
    if junit:
        junit_xml(checks, junit)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown(checks, run))
    return UNHEALTHY if failures else PASSED


def _print(console: Console, run: str, checks: list[Check], failures: list[Check]) -> None:
    """Names are printed as Text, never parsed as rich markup (a run may be ``exp[/]1``)."""
    if not failures:
        console.print(Text(f"actmon gate: {summary_line(run, checks)}"), soft_wrap=True)
        return
    table = Table(title=Text(f"actmon gate: {summary_line(run, checks)}"), title_justify="left")
    for column in ("check", "layer", "value", "allowed", "step"):
        table.add_column(column)
    for c in failures:
        if c.text:
            value, allowed = c.text, "-"
        else:
            value, allowed = f"{c.value:.4g}", f"{c.op} {c.threshold:.4g}"
        step = "-" if c.step is None else str(c.step)
        table.add_row(Text(c.name), Text(c.layer or "-"), Text(value), allowed, step)
    console.print(table)
    for c in failures:
        console.print(Text(f"FAIL {describe(c)}"), soft_wrap=True)
