"""The CI gate: judge a run's store against health thresholds (and a baseline run).

Checks, in order: the run's status (a failed, terminated or unfinished run fails), whether
every window reached every sink (a run whose sinks dropped windows or alerts fails), each
(metric, layer) of the run's final window with a value (dead fraction, saturated fraction),
gradient health (vanishing: the final depth ratio; exploding: a window's largest total gradient
norm against the median of the windows before it), non-finite values anywhere in the run, and
the alerts that fired at or above a chosen severity. ``actmon gate`` prints the failures, writes
JUnit XML and a GitHub step summary; its exit codes are in :data:`EXIT_CODES`.
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from actmon.store import RunInfo, RunStore, first_nonfinite

# Gate metric -> the store's metric name.
GATED = {"dead": "dead_fraction", "saturated": "saturation_fraction"}

SEVERITIES = ("info", "warning", "critical")  # ascending; --fail-on takes one (or "none")

PASSED, UNHEALTHY, USAGE_ERROR, COMMAND_FAILED = 0, 1, 2, 3
EXIT_CODES = {
    PASSED: "healthy: every check passed",
    UNHEALTHY: "unhealthy: a threshold, regression, alert or run status check failed",
    USAGE_ERROR: "usage, config or store error (nothing was judged, or no run store)",
    COMMAND_FAILED: "the command run after -- failed (non-zero exit or killed by a signal)",
}

_UNFINISHED = {
    "running": "the run never finished (status 'running'): the script died, or it did not"
    " call monitor.close() or leave its `with actmon.watch(...)` block",
    "terminated": "the run was terminated (status 'terminated', e.g. by SIGTERM) before it"
    " finished",
}


@dataclass(frozen=True)
class Thresholds:
    """What the gate allows. ``per_layer`` maps a glob to overrides such as {"dead": 0.5}."""

    max_dead: float | None = 0.3
    max_saturated: float | None = 0.5
    allow_nonfinite: bool = False
    per_layer: tuple[tuple[str, str, float], ...] = ()  # (glob, "dead"|"saturated", max)
    baseline_tolerance: float = 0.05
    allow_unfinished: bool = False  # accept a run left 'running' or 'terminated'
    fail_on: str | None = "critical"  # fail on any alert of this severity or above; None: off
    min_grad_depth_ratio: float | None = 1e-4  # vanishing: final first/last gradient ratio
    max_grad_spike: float | None = 100.0  # exploding: window max over the median before it

    def limit(self, kind: str, layer: str) -> float | None:
        for glob, what, value in self.per_layer:
            if what == kind and fnmatch.fnmatchcase(layer, glob):
                return value
        return self.max_dead if kind == "dead" else self.max_saturated


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "dead_fraction[encoder.2]"
    layer: str | None
    metric: str
    value: float
    threshold: float
    step: int | None
    passed: bool
    detail: str = ""
    op: str = "<="  # what is allowed: value <op> threshold
    text: str = ""  # a whole sentence, for checks that are not a number against a limit


def _last_values(db: RunStore, metric: str, run: str) -> dict[str, tuple[int, float]]:
    """Each layer's value of ``metric`` in the last window that has it."""
    out: dict[str, tuple[int, float]] = {}
    for step, layer, _, value in db.metrics(metric, run=run):
        if layer and not math.isnan(value):
            out[layer] = (step, value)
    return out


def evaluate(
    db: RunStore,
    thresholds: Thresholds,
    baseline: RunStore | None = None,
    run: str | None = None,
) -> list[Check]:
    """Every check of the run (the only one when ``run`` is None), passed or not."""
    info = db.run(run)
    name = info.run
    checks = [_status_check(info, thresholds), _completeness_check(info)]
    base_run = None  # the baseline's only run, or its run of the same name
    if baseline is not None:
        runs = baseline.runs()
        base_run = runs[0].run if len(runs) == 1 else baseline.run(name).run
    for kind, metric in GATED.items():
        base: dict[str, tuple[int, float]] = {}
        if baseline is not None and base_run is not None:
            base = _last_values(baseline, metric, base_run)
        for layer, (step, value) in sorted(_last_values(db, metric, name).items()):
            limit = thresholds.limit(kind, layer)
            if limit is not None:
                checks.append(
                    Check(f"{metric}[{layer}]", layer, metric, value, limit, step, value <= limit)
                )
            if layer in base:
                allowed = base[layer][1] + thresholds.baseline_tolerance
                checks.append(
                    Check(
                        f"{metric}[{layer}] vs baseline",
                        layer,
                        metric,
                        value,
                        allowed,
                        step,
                        value <= allowed,
                        f"baseline {base[layer][1]:.4g}"
                        f" + tolerance {thresholds.baseline_tolerance:g}",
                    )
                )
    checks.extend(_gradient_checks(db, thresholds, name))
    if not thresholds.allow_nonfinite:
        checks.append(_nonfinite_check(db, name))
    if thresholds.fail_on is not None:
        checks.extend(_alert_checks(db, thresholds.fail_on, name))
    return checks


def _completeness_check(info: RunInfo) -> Check:
    """A run whose sinks dropped windows or alerts is incomplete: its final window in the store
    may not be the run's final window, and what a sink lost cannot be judged."""
    lost = [
        f"{n} {what}{'s' if n != 1 else ''} by the {sink} sink"
        for what, counts in (("window", info.dropped), ("alert", info.dropped_alerts))
        for sink, n in sorted(counts.items())
        if n
    ]
    if not lost:
        return Check("run_complete", None, "dropped", 0.0, 0.0, None, True)
    text = (
        f"the run is incomplete: {', '.join(lost)} were dropped (a full disk, a failing or slow"
        " sink); what was lost cannot be judged, so fix the sink and run again"
    )
    total = float(sum(info.dropped.values()) + sum(info.dropped_alerts.values()))
    return Check("run_complete", None, "dropped", total, 0.0, None, False, text=text)


def _status_check(info: RunInfo, thresholds: Thresholds) -> Check:
    """A run that did not finish cleanly is not a healthy run, whatever its last window says."""
    status = info.status
    if status == "finished":
        return Check("run_status", None, "run_status", math.nan, math.nan, None, True)
    if status in _UNFINISHED:
        allowed = thresholds.allow_unfinished
        text = f"{_UNFINISHED[status]}; --allow-unfinished accepts such a run"
    elif status == "failed":
        allowed = False
        text = "the run failed: an exception ended training (status 'failed')"
    else:
        allowed = False
        text = f"the run has status {status!r}; only 'finished' passes"
    return Check("run_status", None, "run_status", math.nan, math.nan, None, allowed, text=text)


def _gradient_checks(db: RunStore, thresholds: Thresholds, run: str) -> list[Check]:
    """Vanishing gradients (the final window's first/last layer gradient-norm ratio) and
    exploding ones (a window's largest total gradient norm over the median of the finite ones
    before it; non-finite norms are the non-finite check's)."""
    checks: list[Check] = []
    low = thresholds.min_grad_depth_ratio
    ratios = [(s, v) for s, v in db.series("grad_norm_depth_ratio", run=run) if math.isfinite(v)]
    if low is not None and ratios:
        step, ratio = ratios[-1]
        checks.append(
            Check(
                "vanishing_gradients",
                None,
                "grad_norm_depth_ratio",
                ratio,
                low,
                step,
                ratio >= low,
                "the first layer's gradient norm over the last layer's",
                op=">=",
            )
        )
    high = thresholds.max_grad_spike
    norms = [(s, v) for s, v in db.series("grad_norm_total_max", run=run) if math.isfinite(v)]
    if high is not None and len(norms) > 1:
        worst: tuple[float, int, float] | None = None  # (spike, step, median)
        for i in range(1, len(norms)):
            median = statistics.median(v for _, v in norms[:i])
            if median > 0:
                spike = norms[i][1] / median
                if worst is None or spike > worst[0]:
                    worst = (spike, norms[i][0], median)
        if worst is not None:
            spike, step, median = worst
            checks.append(
                Check(
                    "exploding_gradients",
                    None,
                    "grad_norm_spike",
                    spike,
                    high,
                    step,
                    spike <= high,
                    f"the window's largest total gradient norm over the median {median:.4g}"
                    " of the windows before it",
                )
            )
    return checks


def _nonfinite_check(db: RunStore, run: str) -> Check:
    counts = (
        "nan_count",
        "posinf_count",
        "neginf_count",
        "output_grad_nan_count",
        "output_grad_inf_count",
    )
    total, first_step, first_layer = 0.0, None, None
    for metric in counts:
        for step, layer, _, value in db.metrics(metric, run=run):
            if value > 0:
                total += value
                if first_step is None or step < first_step:
                    first_step, first_layer = step, layer
    confirmed = None
    alerted = first_nonfinite(db.alerts(run))
    if alerted is not None:
        total = max(total, 1.0)
        if first_step is None or alerted.step <= first_step:
            first_step, first_layer, confirmed = alerted.step, alerted.layer, alerted.confirmed_step
    detail = ""
    if total:
        where = f"in layer {first_layer!r}" if first_layer else "in no sampled layer"
        detail = f"first non-finite at step {first_step}, {where}"
        if confirmed is not None and confirmed != first_step:
            detail += f" (layer found at step {confirmed})"
    return Check(
        "nonfinite", first_layer, "nonfinite_count", total, 0.0, first_step, total == 0, detail
    )


def _alert_checks(db: RunStore, fail_on: str, run: str) -> list[Check]:
    """One failing check per (rule, layer) whose alert fired at ``fail_on`` or above (resolved
    later or not); one passing check when none did. NaN/Inf alerts (the nonfinite rule, or a
    NaN/Inf value) are left to the non-finite check, so ``--allow-nonfinite`` means what it says."""
    floor = SEVERITIES.index(fail_on)
    fired: dict[tuple[str, str | None], Check] = {}
    for alert in db.alerts(run):
        if alert.state != "firing" or alert.metric == "nonfinite_count":
            continue
        if not math.isfinite(alert.value):  # e.g. an Inf gradient norm: a non-finite finding
            continue
        if alert.severity not in SEVERITIES or SEVERITIES.index(alert.severity) < floor:
            continue
        key = (alert.rule, alert.layer)
        if key in fired:
            continue
        where = f" on layer {alert.layer!r}" if alert.layer else ""
        text = (
            f"{alert.severity} alert {alert.rule!r} fired{where} at step {alert.step}:"
            f" {alert.metric} was {alert.value:.4g}, the rule allows {_negate(alert.op)}"
            f" {alert.threshold:g}"
        )
        if alert.summary:
            text += f" ({alert.summary})"
        fired[key] = Check(
            f"alert:{alert.rule}" + (f"[{alert.layer}]" if alert.layer else ""),
            alert.layer,
            alert.metric,
            alert.value,
            alert.threshold,
            alert.step,
            False,
            op=_negate(alert.op),
            text=text,
        )
    if fired:
        return list(fired.values())
    name = f"alerts (severity {fail_on} or above)"
    return [Check(name, None, "alerts", 0.0, 0.0, None, True)]


def _negate(op: str) -> str:
    """What a rule allows: the opposite of the condition that fires it."""
    return {">": "<=", ">=": "<", "<": ">=", "<=": ">", "==": "!=", "!=": "=="}.get(op, op)


def command_check(status: int | None, error: str = "") -> Check:
    """The command run after ``--``: passed when it exited 0."""
    if error:
        text = error
    elif status is not None and status < 0:
        text = f"the command was killed by signal {-status}"
    else:
        text = f"the command exited with status {status}"
    return Check("command", None, "exit_status", math.nan, math.nan, None, status == 0, text=text)


def describe(check: Check) -> str:
    """One line for people: what was found, what is allowed, where and when."""
    if check.text:
        return check.text
    where = f" layer {check.layer!r}" if check.layer else ""
    step = f" at step {check.step}" if check.step is not None else ""
    extra = f" ({check.detail})" if check.detail else ""
    return (
        f"{check.metric}{where} = {check.value:.4g}, allowed {check.op} {check.threshold:.4g}"
        f"{step}{extra}"
    )


def summary_line(run: str, checks: list[Check]) -> str:
    """``run passed 3 checks`` / ``run failed 1 of 3 checks`` (singular for one)."""
    failures = sum(1 for c in checks if not c.passed)
    if not failures:
        return f"{run} passed {_checks(len(checks))}"
    return f"{run} failed {failures} of {_checks(len(checks))}"


def _checks(n: int) -> str:
    return f"{n} check" if n == 1 else f"{n} checks"


# XML 1.0 allows tab, newline, carriage return and these ranges; anything else (NUL, other C0
# controls, lone surrogates, U+FFFE/U+FFFF) makes the document malformed.
_XML_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """``text`` with each character XML 1.0 forbids replaced by a visible ``\\xNN``/``\\uNNNN``."""
    return _XML_FORBIDDEN.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text
    )


def junit_xml(checks: list[Check], path: str | Path, suite: str = "actmon gate") -> None:
    """One JUnit test case per check; failures carry the value, threshold and step."""
    failures = [c for c in checks if not c.passed]
    root = ElementTree.Element(
        "testsuite", name=xml_text(suite), tests=str(len(checks)), failures=str(len(failures))
    )
    for check in checks:
        case = ElementTree.SubElement(
            root, "testcase", classname="actmon.gate", name=xml_text(check.name)
        )
        if not check.passed:
            message = xml_text(describe(check))
            failure = ElementTree.SubElement(case, "failure", message=message)
            failure.text = message
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _md(text: str) -> str:
    """A table cell: no line breaks, pipes or HTML from a name."""
    text = " ".join(text.split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown(checks: list[Check], run: str) -> str:
    failures = [c for c in checks if not c.passed]
    verdict = "passed" if not failures else f"failed ({len(failures)} of {_checks(len(checks))})"
    lines = [f"### actmon gate: {_md(run)} {verdict}", ""]
    if failures:
        lines += ["| check | value | allowed | step |", "|---|---|---|---|"]
        for c in failures:
            if c.text:
                lines.append(f"| {_md(c.name)} | {_md(c.text)} | | {_md(str(c.step or ''))} |")
            else:
                lines.append(
                    f"| {_md(c.name)} | {c.value:.4g} | {c.op} {c.threshold:.4g} | {c.step} |"
                )
    return "\n".join(lines) + "\n"
