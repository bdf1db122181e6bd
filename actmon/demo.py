"""``actmon demo``: real small trainings that show each failure mode and the alert it raises.

Nothing is downloaded: the data are scikit-learn's digits. Every sink is on (run store,
TensorBoard, Prometheus on 127.0.0.1, the console table) and the run ends with the HTML report.

Scenarios:

* ``glitch`` (default): a healthy MLP meets one corrupted batch (Inf inputs) at 40% of the
  run; the loop skips that update, so the ``nonfinite`` alert fires and then resolves.
* ``healthy``: the same run without the glitch; nothing fires.
* ``dying-relu``: SGD with a learning rate far too high kills the ReLUs (``dead_units``).
* ``saturation``: a deep sigmoid stack with a large init (``saturating_hidden_stack`` and
  ``init_mismatch`` at attach, then the runtime ``saturation`` rule once most hidden outputs
  have stayed saturated for 100 steps).
* ``nan``: a weight turns NaN mid-run (``nonfinite``, naming the first offending layer).
* ``double-softmax``: a softmax fed to CrossEntropyLoss (``double_softmax`` at step 1).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text
from torch import nn

import actmon
from actmon.sinks.console import ConsoleSink

SCENARIOS = ("glitch", "healthy", "dying-relu", "saturation", "nan", "double-softmax")
# The rule each scenario is there to show (at the default 300 steps); None: nothing fires.
SCENARIO_RULE: dict[str, str | None] = {
    "glitch": "nonfinite",
    "healthy": None,
    "dying-relu": "dead_units",
    "saturation": "saturation",
    "nan": "nonfinite",
    "double-softmax": "double_softmax",
}


class _ShownByTheTable(logging.Filter):
    """Drops the monitor's "actmon alert: ..." log lines: the demo's table prints each alert
    as it fires, and a second copy on stderr would repeat every one of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("actmon alert:")


@dataclass
class DemoResult:
    monitor: actmon.Monitor
    final_loss: float
    accuracy: float
    report: Path | None = None
    alerts: list[actmon.Alert] = field(default_factory=list)


@dataclass
class _Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    glitch_step: int | None = None  # a batch of Inf inputs at this step (the update is skipped)
    poison_step: int | None = None  # a weight turns NaN at this step


def _mlp(widths: tuple[int, ...], act: type[nn.Module], kaiming: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1])
        if kaiming:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _setup(scenario: str, steps: int) -> _Setup:
    torch.manual_seed(0)
    ce = nn.CrossEntropyLoss()
    if scenario in ("glitch", "healthy", "nan"):
        model = _mlp((64, 128, 64, 10), nn.ReLU, kaiming=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return _Setup(
            model,
            opt,
            ce,
            glitch_step=int(steps * 0.4) if scenario == "glitch" else None,
            poison_step=int(steps * 0.5) if scenario == "nan" else None,
        )
    if scenario == "dying-relu":
        model = _mlp((64, 128, 64, 10), nn.ReLU, kaiming=False)
        return _Setup(model, torch.optim.SGD(model.parameters(), lr=1.0), ce)
    if scenario == "saturation":
        model = _mlp((64, 64, 64, 64, 64, 10), nn.Sigmoid, kaiming=False)
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 2.0)
        return _Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), ce)
    if scenario == "double-softmax":
        model = nn.Sequential(_mlp((64, 128, 10), nn.ReLU, kaiming=True), nn.Softmax(dim=1))
        return _Setup(model, torch.optim.Adam(model.parameters(), lr=1e-3), ce)
    raise ValueError(f"scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")


def run_demo(
    steps: int = 300,
    batch_size: int = 64,
    log_every: int = 25,
    console: Console | None = None,
    config: str | None = None,
    out: str = "runs",
    scenario: str = "glitch",
    serve: bool = False,
    report: bool = True,
) -> DemoResult:
    """Train on digits with every sink on; returns the monitor and where the report is."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("actmon demo needs scikit-learn: pip install 'actmon[demo]'") from exc

    console = console or Console()
    setup = _setup(scenario, steps)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    run = f"demo-{scenario}"
    # Under out/<run>: a re-run claims demo-<scenario>-2, ... and keeps the earlier runs.
    template = Path(str(out).replace("{", "{{").replace("}", "}}")) / "{run}"
    sinks = {
        "store": {"enabled": True, "path": str(template / "actmon.db")},
        "tensorboard": {"enabled": True, "log_dir": str(template / "tensorboard")},
        "prometheus": {"enabled": True, "port": 0},
        "console": {"enabled": False},  # the full table below instead of the compact view
    }
    table = ConsoleSink(every=max(1, steps // log_every // 3), console=console)
    model, opt = setup.model, setup.optimizer
    monitor = actmon.watch(
        model,
        optimizer=opt,
        config=config,
        extra_sinks=[table],
        loss_fn=setup.loss_fn,
        log_every=log_every,
        sample_every=1,
        run_name=run,
        sinks=sinks,
    )
    base = Path(out) / monitor.run
    console.print(
        f"actmon demo [bold]{scenario}[/]: {steps} steps on digits; Prometheus at"
        f" {monitor.prometheus_url}"
    )
    loss = torch.tensor(0.0)
    quiet = _ShownByTheTable()
    logging.getLogger("actmon").addFilter(quiet)
    try:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (batch_size,), generator=gen)
            inputs = x[idx]
            if step == setup.glitch_step:
                inputs = inputs.clone()
                inputs[0, :8] = math.inf  # a corrupted batch
            if step == setup.poison_step:
                with torch.no_grad():
                    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
                    first.weight[0, 0] = math.nan
            loss = setup.loss_fn(model(inputs), y[idx])
            if torch.isfinite(loss) or setup.poison_step is not None:
                loss.backward()  # a demo loop may read the loss; the monitor never does
                opt.step()
            opt.zero_grad()
            monitor.step(loss=loss)
        if serve:
            console.print(f"serving {monitor.prometheus_url} until Ctrl-C")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        monitor.close()
        logging.getLogger("actmon").removeFilter(quiet)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    result = DemoResult(monitor, float(loss.detach()), accuracy, alerts=list(monitor.alerts))
    fired = [a for a in monitor.alerts if a.state == "firing"]
    resolved = [a for a in monitor.alerts if a.state == "resolved"]
    console.print(
        f"trained {steps} steps: final loss {result.final_loss:.3f}, accuracy {accuracy:.1%};"
        f" alerts fired {len(fired)}, resolved {len(resolved)}; monitor overhead"
        f" {monitor.overhead_seconds_total * 1e3:.0f} ms, internal errors"
        f" {monitor.internal_errors_total}"
    )
    for line in _timeline(monitor.alerts):  # one line per alert: when it fired and resolved
        console.print(Text(line))
    if report:
        from actmon.report import write_report

        result.report = write_report(base / "actmon.db", base / "report.html")
    console.print(Text(f"run store:   {base / 'actmon.db'}"))
    console.print(Text(f"TensorBoard: tensorboard --logdir {base / 'tensorboard'}"))
    console.print(Text(f"report:      {result.report}"))
    return result


def _timeline(alerts: list[actmon.Alert]) -> list[str]:
    """Each (rule, layer) once, e.g. "nonfinite (critical) on layer '0': fired at step 120,
    resolved at step 150" (the full text was printed when it fired)."""
    events: dict[tuple[str, str | None], list[str]] = {}
    severity: dict[tuple[str, str | None], str] = {}
    for alert in alerts:
        key = (alert.rule, alert.layer)
        run_level = (alert.rule, None)
        reissued = run_level in events and events[run_level][-1].startswith("fired")
        if alert.state == "firing" and alert.layer is not None and reissued:
            events[key] = events.pop(run_level)  # the same alert, re-issued naming its layer
            severity[key] = severity.pop(run_level)
            continue
        severity[key] = alert.severity
        when = "at attach" if alert.step == 0 else f"at step {alert.step}"
        state = "fired" if alert.state == "firing" else "resolved"
        events.setdefault(key, []).append(f"{state} {when}")
    lines = []
    for (rule, layer), what in events.items():
        where = f" on layer {layer!r}" if layer else ""
        lines.append(f"  {rule} ({severity[(rule, layer)]}){where}: {', '.join(what)}")
    return lines
