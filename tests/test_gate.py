"""`actmon gate` and `actmon.testing.assert_healthy`."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import actmon
from actmon.cli import main
from actmon.testing import assert_healthy
from tests.test_monitor import NaNAt

ROOT = Path(__file__).resolve().parents[1]


def _store(tmp_path: Path, model: nn.Module, name: str, steps: int = 20, lr: float = 0.01) -> Path:
    path = tmp_path / f"{name}.db"
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with actmon.watch(
        model,
        optimizer=opt,
        run_name=name,
        log_every=5,
        sample_every=1,
        sinks={"store": {"path": str(path)}},
    ) as monitor:
        for _ in range(steps):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    return path


def _healthy() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    nn.init.zeros_(model[0].bias)
    return model


def _dying(fraction: float = 0.75) -> nn.Module:
    model = _healthy()
    with torch.no_grad():
        model[0].bias[: int(32 * fraction)] = -100.0
    return model


def _gate(*args: str):
    return CliRunner().invoke(main, ["gate", *args])


def test_gate_passes_a_healthy_run(tmp_path):
    result = _gate("--store", str(_store(tmp_path, _healthy(), "ok")))
    assert result.exit_code == 0, result.output
    assert "actmon gate: ok passed" in result.output


def test_gate_fails_a_dying_relu_run_naming_the_layer(tmp_path):
    junit = tmp_path / "report.xml"
    summary = tmp_path / "summary.md"
    result = CliRunner(env={"GITHUB_STEP_SUMMARY": str(summary)}).invoke(
        main, ["gate", "--store", str(_store(tmp_path, _dying(), "dying")), "--junit", str(junit)]
    )
    assert result.exit_code == 1, result.output
    assert "FAIL dead_fraction layer '1' = 0.75, allowed <= 0.3 at step 20" in result.output
    suite = ElementTree.parse(junit).getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    failed = [c.get("name") for c in suite if c.find("failure") is not None]
    assert failed == ["dead_fraction[1]"]
    assert "| dead_fraction[1] | 0.75 | <= 0.3 | 20 |" in summary.read_text()


def test_flags_and_per_layer_overrides(tmp_path):
    store = str(_store(tmp_path, _dying(), "dying"))
    assert _gate("--store", store, "--max-dead", "0.8").exit_code == 0
    assert _gate("--store", store, "--layer", "1=dead:0.9").exit_code == 0
    assert _gate("--store", store, "--layer", "0*=dead:0.9").exit_code == 1
    config = tmp_path / "gate.yaml"
    config.write_text("gate:\n  per_layer:\n    '1': {dead: 0.8}\n")
    assert _gate("--store", store, "--config", str(config)).exit_code == 0


def test_gate_fails_a_nan_run_naming_the_layer(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), NaNAt(step=12), nn.Linear(16, 2))
    store = str(_store(tmp_path, model, "nan"))
    result = _gate("--store", store, "--max-dead", "1")
    assert result.exit_code == 1, result.output
    assert "FAIL nonfinite_count layer '2'" in result.output
    assert "first non-finite at step 12, in layer '2'" in result.output
    assert (
        _gate(
            "--store", store, "--max-dead", "1", "--max-saturated", "1", "--allow-nonfinite"
        ).exit_code
        == 0
    )


def test_baseline_regression(tmp_path):
    base = str(_store(tmp_path, _dying(0.25), "main"))
    worse = str(_store(tmp_path, _dying(0.5), "branch"))
    result = _gate("--store", worse, "--max-dead", "1", "--baseline", base)
    assert result.exit_code == 1, result.output
    assert "dead_fraction[1] vs baseline" in result.output
    assert "baseline 0.25 + tolerance 0.05" in result.output
    assert _gate("--store", base, "--max-dead", "1", "--baseline", base).exit_code == 0


def test_usage_and_store_errors_exit_2(tmp_path):
    missing = _gate("--store", str(tmp_path / "none.db"))
    assert missing.exit_code == 2
    assert "does not exist" in missing.output
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"garbage" * 200)
    bad = _gate("--store", str(corrupt))
    assert bad.exit_code == 2
    assert "is not a readable actmon run store" in bad.output
    assert _gate().exit_code == 2  # neither a store nor a command
    flag = _gate("--store", str(corrupt), "--layer", "x=dead")
    assert flag.exit_code == 2
    assert "expected GLOB=KIND:MAX" in flag.output
    assert _gate("--store", str(corrupt), "--max-dead", "3").exit_code == 2


def test_gate_runs_a_command_with_its_config(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        import actmon
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        with torch.no_grad():
            model[0].bias[:24] = -100.0
        with actmon.watch(model, run_name="scripted", log_every=100) as monitor:
            for _ in range(20):
                model(torch.randn(16, 8)).pow(2).mean().backward()
                monitor.step()
    """)
    )
    config = ROOT / "configs" / "ci-gate.yaml"
    result = _gate("--config", str(config), "--", sys.executable, str(script))
    assert result.exit_code == 1, result.output
    assert "actmon gate: scripted failed" in result.output
    assert "FAIL dead_fraction layer '1' = 0.75" in result.output


def test_assert_healthy():
    batches = [(torch.randn(16, 8), torch.randn(16, 2)) for _ in range(3)]
    snap = assert_healthy(_healthy(), batches, nn.functional.mse_loss, steps=20)
    assert snap.window == (11, 20)
    with pytest.raises(AssertionError, match=r"layer '1': dead_fraction 0.750 > 0.3"):
        assert_healthy(_dying(), batches, nn.functional.mse_loss, steps=20)
