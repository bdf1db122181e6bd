"""The CI gate: judge a finished run's store against health thresholds (and a baseline run).

Each check is one (metric, layer) of the run's final window with a value (dead fraction,
saturated fraction), or the whole run for non-finite values. ``actmon gate`` prints the
failures, writes JUnit XML and a GitHub step summary, and exits 0 (pass), 1 (a threshold or
regression crossed) or 2 (usage, config or store error).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from actmon.store import RunStore, first_nonfinite

# Gate metric -> the store's metric name.
GATED = {"dead": "dead_fraction", "saturated": "saturation_fraction"}


@dataclass(frozen=True)
class Thresholds:
    """What the gate allows. ``per_layer`` maps a glob to overrides such as {"dead": 0.5}."""

    max_dead: float | None = 0.3
    max_saturated: float | None = 0.5
    allow_nonfinite: bool = False
    per_layer: tuple[tuple[str, str, float], ...] = ()  # (glob, "dead"|"saturated", max)
    baseline_tolerance: float = 0.05

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


def _last_values(db: RunStore, metric: str) -> dict[str, tuple[int, float]]:
    """Each layer's value of ``metric`` in the last window that has it."""
    out: dict[str, tuple[int, float]] = {}
    for step, layer, _, value in db.metrics(metric):
        if layer and not math.isnan(value):
            out[layer] = (step, value)
    return out


def evaluate(db: RunStore, thresholds: Thresholds, baseline: RunStore | None = None) -> list[Check]:
    """Every check of the run (one per gated layer metric, plus non-finite), passed or not."""
    checks: list[Check] = []
    for kind, metric in GATED.items():
        base = _last_values(baseline, metric) if baseline is not None else {}
        for layer, (step, value) in sorted(_last_values(db, metric).items()):
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
    if not thresholds.allow_nonfinite:
        checks.append(_nonfinite_check(db))
    return checks


def _nonfinite_check(db: RunStore) -> Check:
    counts = (
        "nan_count",
        "posinf_count",
        "neginf_count",
        "output_grad_nan_count",
        "output_grad_inf_count",
    )
    total, first_step, first_layer = 0.0, None, None
    for metric in counts:
        for step, layer, _, value in db.metrics(metric):
            if value > 0:
                total += value
                if first_step is None or step < first_step:
                    first_step, first_layer = step, layer
    confirmed = None
    alerted = first_nonfinite(db.alerts())
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


def junit_xml(checks: list[Check], path: str | Path, suite: str = "actmon gate") -> None:
    """One JUnit test case per check; failures carry the value, threshold and step."""
    failures = [c for c in checks if not c.passed]
    root = ElementTree.Element(
        "testsuite", name=suite, tests=str(len(checks)), failures=str(len(failures))
    )
    for check in checks:
        case = ElementTree.SubElement(root, "testcase", classname="actmon.gate", name=check.name)
        if not check.passed:
            failure = ElementTree.SubElement(case, "failure", message=describe(check))
            failure.text = describe(check)
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def describe(check: Check) -> str:
    where = f" layer {check.layer!r}" if check.layer else ""
    step = f" at step {check.step}" if check.step is not None else ""
    extra = f" ({check.detail})" if check.detail else ""
    return (
        f"{check.metric}{where} = {check.value:.4g}, allowed <= {check.threshold:.4g}{step}{extra}"
    )


def markdown(checks: list[Check], run: str) -> str:
    failures = [c for c in checks if not c.passed]
    verdict = "passed" if not failures else f"failed ({len(failures)} of {len(checks)} checks)"
    lines = [f"### actmon gate: {run} {verdict}", ""]
    if failures:
        lines += ["| check | value | allowed | step |", "|---|---|---|---|"]
        lines += [
            f"| {c.name} | {c.value:.4g} | <= {c.threshold:.4g} | {c.step} |" for c in failures
        ]
    return "\n".join(lines) + "\n"
