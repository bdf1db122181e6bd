"""The demo: a real digits training that shows a dead layer beside healthy ones."""

from __future__ import annotations

import io

from click.testing import CliRunner
from rich.console import Console

from actmon.cli import main
from actmon.demo import run_demo


def test_demo_trains_and_reports_the_dead_layer():
    out = io.StringIO()
    result = run_demo(steps=60, log_every=20, console=Console(file=out, width=160))
    snap = result.monitor.snapshot()
    assert snap is not None
    assert snap.window == (41, 60)
    # 32 of the 64 units of layer "3" have a -50 bias: dead for certain, maybe more.
    assert snap.layers["3"].dead_units >= 32
    assert snap.layers["1"].dead_fraction < 0.5
    assert result.accuracy > 0.5
    assert result.monitor.internal_errors_total == 0
    text = out.getvalue()
    assert "actmon digits-demo: steps 41-60" in text
    assert "trained 60 steps on digits" in text


def test_cli_demo_and_version():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.startswith("actmon, version ")
    result = runner.invoke(main, ["demo", "--steps", "20", "--log-every", "10"])
    assert result.exit_code == 0, result.output
    assert "trained 20 steps on digits" in result.output
