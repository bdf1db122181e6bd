"""`actmon gate` and `actmon.testing.assert_healthy`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import actmon
import actmon.store
from actmon.cli import main
from actmon.gate import Check, summary_line
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
    cases = [c.get("name") for c in suite]
    assert cases == [
        "run_status",
        "run_complete",
        "dead_fraction[1]",
        "vanishing_gradients",
        "exploding_gradients",
        "nonfinite",
        "alerts (severity critical or above)",
    ]
    assert (suite.get("tests"), suite.get("failures")) == ("7", "1")
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


# ---- a CI tool's semantics ---------------------------------------------------------------


def _script(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    """A training script: a healthy model trained for 20 steps, then ``body``."""
    script = tmp_path / name
    script.write_text(
        textwrap.dedent("""
        import os, sys, signal
        import torch
        from torch import nn
        import actmon
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
        nn.init.zeros_(model[0].bias)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        def train(monitor, steps=20):
            for _ in range(steps):
                loss = model(torch.randn(16, 8)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                monitor.step(loss=loss)
        """)
        + textwrap.dedent(body)
    )
    return script


def test_a_failed_run_fails_the_gate_with_the_reason(tmp_path):
    path = tmp_path / "failed.db"
    model = _healthy()
    monitor = actmon.watch(
        model, run_name="crashed", log_every=5, sinks={"store": {"path": str(path)}}
    )

    def train() -> None:
        with monitor:
            for _ in range(10):
                model(torch.randn(16, 8)).pow(2).mean().backward()
                monitor.step()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train()
    result = _gate("--store", str(path))
    assert result.exit_code == 1, result.output
    assert "FAIL the run failed: an exception ended training (status 'failed')" in result.output
    # --allow-unfinished is for unfinished runs; a failed one still fails.
    assert _gate("--store", str(path), "--allow-unfinished").exit_code == 1


def test_an_unfinished_run_fails_unless_allowed(tmp_path):
    store = tmp_path / "died.db"
    script = _script(
        tmp_path,
        f"""
        monitor = actmon.watch(model, optimizer=opt, run_name="died", log_every=5,
                               sinks={{"store": {{"path": {str(store)!r}}}}})
        train(monitor)
        import time; time.sleep(1.0)  # the store's thread writes the windows
        os._exit(0)  # dies without close(), atexit or a signal handler
        """,
    )
    subprocess.run([sys.executable, str(script)], check=True, cwd=ROOT)
    result = _gate("--store", str(store))
    assert result.exit_code == 1, result.output
    assert "FAIL the run never finished (status 'running')" in result.output
    assert "--allow-unfinished accepts such a run" in result.output
    allowed = _gate("--store", str(store), "--allow-unfinished")
    assert allowed.exit_code == 0, allowed.output
    config = tmp_path / "gate.yaml"
    config.write_text("gate:\n  allow_unfinished: true\n")
    assert _gate("--store", str(store), "--config", str(config)).exit_code == 0


def test_command_mode_keeps_the_store_where_it_says(tmp_path, monkeypatch):
    script = _script(
        tmp_path,
        """
        with actmon.watch(model, optimizer=opt, run_name="kept", log_every=5) as monitor:
            train(monitor)
        """,
    )
    keep = tmp_path / "ci-store"
    result = _gate("--keep-store", str(keep), "--", sys.executable, str(script))
    assert result.exit_code == 0, result.output
    assert "actmon gate: kept passed 8 checks" in result.output
    path = keep / "actmon.db"
    assert f"run store kept at {path}; read it with: actmon report {path}" in result.output
    with actmon.store.open(path) as db:
        assert db.run().status == "finished"
        assert len(db.windows()) == 4
    # Without --keep-store: a new directory under runs/ in the working directory, each time.
    monkeypatch.chdir(tmp_path)
    first = _gate("--", sys.executable, str(script))
    second = _gate("--", sys.executable, str(script))
    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    stores = sorted((tmp_path / "runs").glob("gate-*/actmon.db"))
    assert len(stores) == 2
    for store in stores:
        assert f"run store kept at {store.relative_to(tmp_path)}" in first.output + second.output
    # A reused --keep-store DIR: the gate judges the run this command wrote.
    again = _gate("--keep-store", str(keep), "--", sys.executable, str(script))
    assert again.exit_code == 0, again.output
    assert "actmon gate: kept-2 passed" in again.output  # the new run, not the first one


def test_a_script_that_never_calls_watch_is_told_what_to_do(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("print('training without actmon')\n")
    keep = tmp_path / "store"
    junit = tmp_path / "junit.xml"
    result = _gate(
        "--keep-store", str(keep), "--junit", str(junit), "--", sys.executable, str(script)
    )
    assert result.exit_code == 2, result.output
    assert (
        f"the command wrote no run store (expected at {str(keep / 'actmon.db')!r}): the script"
        " must call actmon.watch(...) (or use the Lightning / Hugging Face ActmonCallback)"
    ) in result.output
    assert "$ACTMON_CONFIG" in result.output
    assert ElementTree.parse(junit).getroot().get("failures") == "1"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("raise SystemExit(7)", "the command exited with status 7"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "the command was killed by SIGKILL"),
    ],
)
def test_a_failing_command_exits_3_and_still_shows_its_checks(tmp_path, body, reason):
    script = _script(
        tmp_path,
        f"""
        with actmon.watch(model, optimizer=opt, run_name="partial", log_every=5) as monitor:
            train(monitor)
        import time; time.sleep(0.5)
        {body}
        """,
    )
    junit = tmp_path / "junit.xml"
    result = _gate(
        "--keep-store",
        str(tmp_path / "s"),
        "--junit",
        str(junit),
        "--",
        sys.executable,
        str(script),
    )
    assert result.exit_code == 3, result.output
    assert f"actmon gate: {reason}" in result.output
    assert re.search(r"actmon gate: partial failed 1 of \d+ checks", result.output)
    assert f"FAIL {reason}" in result.output
    failed = [
        c.get("name") for c in ElementTree.parse(junit).getroot() if c.find("failure") is not None
    ]
    assert failed == ["command"]


def test_a_command_that_cannot_start_exits_3(tmp_path):
    result = _gate("--keep-store", str(tmp_path / "s"), "--", str(tmp_path / "no-such-program"))
    assert result.exit_code == 3, result.output
    assert "cannot run" in result.output
    assert "No such file or directory" in result.output


def test_usage_messages(tmp_path):
    neither = _gate()
    assert neither.exit_code == 2
    assert (
        "nothing to judge: give --store PATH (a run store) or the training command after --"
        in neither.output
    )
    both = _gate("--store", "x.db", "--", "python", "t.py")
    assert both.exit_code == 2
    assert "give --store PATH or a command after --, not both" in both.output


def test_run_not_found_lists_the_runs(tmp_path):
    path = tmp_path / "two.db"
    for name in ("alpha", "beta"):
        model = _healthy()
        with actmon.watch(
            model, run_name=name, log_every=5, sinks={"store": {"path": str(path)}}
        ) as monitor:
            for _ in range(5):
                model(torch.randn(4, 8)).sum().backward()
                monitor.step()
    nope = _gate("--store", str(path), "--run", "nope")
    assert nope.exit_code == 2
    assert f"run 'nope' is not in {str(path)!r}; it holds 'alpha', 'beta'" in nope.output
    unnamed = _gate("--store", str(path))
    assert unnamed.exit_code == 2
    assert "holds 2 runs; name one with --run: 'alpha', 'beta'" in unnamed.output
    assert _gate("--store", str(path), "--run", "beta").exit_code == 0


def test_grammar():
    passed = Check("run_status", None, "run_status", 0.0, 0.0, None, True)
    failed = Check("x", None, "m", 1.0, 0.0, 1, False)
    assert summary_line("r", [passed]) == "r passed 1 check"
    assert summary_line("r", [passed, passed]) == "r passed 2 checks"
    assert summary_line("r", [failed]) == "r failed 1 of 1 check"
    assert summary_line("r", [failed, passed, passed]) == "r failed 1 of 3 checks"


def test_fail_on_severity(tmp_path):
    config = tmp_path / "rules.yaml"
    config.write_text(
        textwrap.dedent("""
        rules:
          - {name: dead_warn, metric: dead_fraction, op: ">", threshold: 0.3, severity: warning,
             summary: too many dead units}
          - {name: dead_info, metric: dead_fraction, op: ">", threshold: 0.1, severity: info}
        """)
    )
    path = tmp_path / "warned.db"
    model = _dying()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with actmon.watch(
        model,
        optimizer=opt,
        config=str(config),
        run_name="warned",
        log_every=5,
        sample_every=1,
        sinks={"store": {"path": str(path)}},
    ) as monitor:
        for _ in range(10):
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    store = str(path)
    assert _gate("--store", store, "--max-dead", "1").exit_code == 0  # default: critical only
    warn = _gate("--store", store, "--max-dead", "1", "--fail-on", "warning")
    assert warn.exit_code == 1, warn.output
    assert (
        "FAIL warning alert 'dead_warn' fired on layer '1' at step 5: dead_fraction was 0.75,"
        " the rule allows <= 0.3 (too many dead units)"
    ) in warn.output
    assert "dead_info" not in warn.output
    info = _gate("--store", store, "--max-dead", "1", "--fail-on", "info")
    assert "actmon gate: warned failed 2 of 8 checks" in info.output
    assert _gate("--store", store, "--max-dead", "1", "--fail-on", "none").exit_code == 0
    gate_cfg = tmp_path / "gate.yaml"
    gate_cfg.write_text("gate:\n  fail_on: warning\n  max_dead: 1\n")
    assert _gate("--store", store, "--config", str(gate_cfg)).exit_code == 1


def _deep_sigmoid() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def test_vanishing_gradients_fail_the_gate(tmp_path):
    torch.manual_seed(0)
    store = str(_store(tmp_path, _deep_sigmoid(), "vanishing"))
    with actmon.store.open(store) as db:
        _step, ratio = db.series("grad_norm_depth_ratio")[-1]
    assert ratio < 1e-4
    result = _gate("--store", store)
    assert result.exit_code == 1, result.output
    assert (
        f"FAIL grad_norm_depth_ratio = {ratio:.4g}, allowed >= 0.0001 at step 20 (the first"
        " layer's gradient norm over the last layer's)"
    ) in result.output
    config = tmp_path / "gate.yaml"
    config.write_text("gate:\n  min_grad_depth_ratio: null\n")
    assert _gate("--store", store, "--config", str(config)).exit_code == 0


def test_exploding_gradients_fail_the_gate(tmp_path):
    path = tmp_path / "exploding.db"
    model = _healthy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay; only the loss scales
    with actmon.watch(
        model,
        optimizer=opt,
        run_name="exploding",
        log_every=5,
        sample_every=1,
        sinks={"store": {"path": str(path)}},
    ) as monitor:
        for step in range(1, 21):
            loss = model(torch.randn(16, 8)).pow(2).mean() * (1e4 if step == 17 else 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
    with actmon.store.open(path) as db:
        norms = [v for _, v in db.series("grad_norm_total_max")]
    spike = norms[3] / float(np.median(norms[:3]))  # the fourth window against the three before
    assert spike > 100
    result = _gate("--store", str(path))
    assert result.exit_code == 1, result.output
    assert f"FAIL grad_norm_spike = {spike:.4g}, allowed <= 100 at step 20" in result.output
    assert "alert:exploding_gradients" in result.output  # the critical rule fired too


def _named_dying(relu_name: str) -> nn.Module:
    model = nn.Sequential(
        OrderedDict([("lin", nn.Linear(8, 32)), (relu_name, nn.ReLU()), ("out", nn.Linear(32, 2))])
    )
    with torch.no_grad():
        model.lin.bias[:24] = -100.0
    return model


@pytest.mark.parametrize("run", ["exp[/]1", "exp[bold]1", "[red]x[/red]"])
def test_names_with_rich_markup_print_as_they_are(tmp_path, run):
    ok = _gate("--store", str(_store(tmp_path, _healthy(), run)))
    assert ok.exit_code == 0, ok.output
    assert f"actmon gate: {run} passed" in ok.output
    layer = "[/]closing[bold red]"
    bad = _gate("--store", str(_store(tmp_path, _named_dying(layer), f"{run}-bad")))
    assert bad.exit_code == 1, bad.output
    assert f"actmon gate: {run}-bad failed 1 of" in bad.output
    assert f"FAIL dead_fraction layer {layer!r} = 0.75" in bad.output
    assert f"dead_fraction[{layer}]" in bad.output  # the table cell too


def test_junit_is_well_formed_whatever_the_names_hold(tmp_path):
    layer = "re\x00lu\x1b[31m\ufffe"
    junit = tmp_path / "junit.xml"
    store = _store(tmp_path, _named_dying(layer), "nul")
    summary = tmp_path / "summary.md"
    result = CliRunner(env={"GITHUB_STEP_SUMMARY": str(summary)}).invoke(
        main, ["gate", "--store", str(store), "--junit", str(junit)]
    )
    assert result.exit_code == 1, result.output
    suite = ElementTree.parse(junit).getroot()  # raises on malformed XML
    failed = [c for c in suite if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["dead_fraction[re\\x00lu\\x1b[31m\\ufffe]"]
    message = failed[0].find("failure").get("message")
    assert message.startswith("dead_fraction layer 're\\x00lu\\x1b[31m\\ufffe' = 0.75")
    assert "| dead_fraction[re\x00lu\x1b[31m\ufffe] | 0.75 |" in summary.read_text()
