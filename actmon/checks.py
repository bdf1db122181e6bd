"""Model checks run once, at attach and on the first loss call: mistakes visible before training.

* ``double_softmax`` — probabilities fed to a loss that expects logits (CrossEntropyLoss after a
  softmax, BCEWithLogitsLoss after a sigmoid), seen from the loss input when ``loss_fn`` is given,
  else from a Softmax as the model's last layer.
* ``saturating_hidden_stack`` — three or more sigmoid/tanh hidden layers: gradients vanish.
* ``init_mismatch`` — a Linear/Conv feeding an activation with a weight scale more than 10x
  above or 20x below what that activation's standard init (Kaiming / Xavier) gives.

Every legal model can be watched: a check never raises into ``watch()`` or the loss's forward.
Weights it cannot read (zero-size, on the meta device, not yet materialised) are skipped; any
other failure is reported to ``on_error("(model check) <name>", exc)``, like a hook's, and the
other checks go on.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from actmon.kinds import Kind, classify
from actmon.rules import Alert, Severity

SATURATING_STACK = 3
INIT_TOO_LARGE, INIT_TOO_SMALL = 10.0, 1 / 20

_RUNBOOKS = {
    "double_softmax": "Remove the final softmax/sigmoid: the loss applies it itself.",
    "saturating_hidden_stack": "Use ReLU/GELU hidden activations or add normalisation.",
    "init_mismatch": "Initialise with nn.init.kaiming_* for ReLU-like, xavier_* for tanh/sigmoid.",
}


def _alert(
    rule: str,
    layer: str | None,
    severity: Severity,
    metric: str,
    value: float,
    op: str,
    threshold: float,
    step: int,
    summary: str,
) -> Alert:
    return Alert(
        rule=rule,
        layer=layer,
        severity=severity,
        metric=metric,
        value=value,
        op=op,
        threshold=threshold,
        step=step,
        first_seen=step,
        summary=summary,
        runbook=_RUNBOOKS[rule],
        actions=("log", "callback"),
    )


OnError = Callable[[str, BaseException], None]


def attach_checks(model: nn.Module, has_loss_fn: bool, on_error: OnError) -> list[Alert]:
    """Structural checks on the model as watched (step 0); each one contained on its own."""
    from actmon.attach import named_modules  # layer names without DDP / compile prefixes

    leaves = [
        (name or "(root)", m)
        for name, m in named_modules(model)
        if not any(True for _ in m.children())
    ]
    kinds = [(name, classify(m).kind, m) for name, m in leaves]
    tasks: list[tuple[str, Callable[[], list[Alert]]]] = [
        ("saturating_hidden_stack", lambda: _stack_check(kinds))
    ]
    if not has_loss_fn:  # else the loss input check sees what the loss really receives
        tasks.append(("double_softmax", lambda: _last_softmax_check(kinds)))
    tasks += [
        ("init_mismatch", functools.partial(_init_check, name, module, next_kind))
        for (name, _, module), (_, next_kind, _) in itertools.pairwise(kinds)
    ]
    alerts: list[Alert] = []
    for rule, check in tasks:
        try:
            alerts.extend(check())
        except Exception as exc:  # a check never stops watch(): counted, logged once
            on_error(f"(model check) {rule}", exc)
    return alerts


def _stack_check(kinds: list[tuple[str, Kind, nn.Module]]) -> list[Alert]:
    alerts: list[Alert] = []
    hidden = [name for name, kind, _ in kinds[:-1] if kind in (Kind.SIGMOID, Kind.TANH)]
    if len(hidden) >= SATURATING_STACK:
        alerts.append(
            _alert(
                "saturating_hidden_stack",
                hidden[-1],
                "warning",
                "saturating_hidden_layers",
                len(hidden),
                ">=",
                SATURATING_STACK,
                0,
                f"{len(hidden)} sigmoid/tanh hidden layers ({', '.join(hidden)}): deep saturating"
                " stacks train slowly or not at all",
            )
        )
    return alerts


def _last_softmax_check(kinds: list[tuple[str, Kind, nn.Module]]) -> list[Alert]:
    alerts: list[Alert] = []
    if kinds and kinds[-1][1] is Kind.SOFTMAX:
        module = kinds[-1][2]
        if isinstance(module, nn.Softmax):
            alerts.append(
                _alert(
                    "double_softmax",
                    kinds[-1][0],
                    "warning",
                    "last_layer_softmax",
                    1,
                    "==",
                    1,
                    0,
                    "the model ends in a Softmax: CrossEntropyLoss/NLLLoss expect logits/log-probs",
                )
            )
    return alerts


def _init_check(name: str, module: nn.Module, next_kind: Kind) -> list[Alert]:
    """init_mismatch for one Linear/Conv and the activation after it."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not _readable(
        weight
    ):
        return []
    assert isinstance(weight, Tensor)
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    if next_kind in (Kind.RELU, Kind.LEAKY, Kind.SMOOTH_GATED):
        expected, family = math.sqrt(2.0 / fan_in), "Kaiming (ReLU-like)"
    elif next_kind in (Kind.SIGMOID, Kind.TANH):
        receptive = weight[0, 0].numel()
        expected = math.sqrt(2.0 / (fan_in + fan_out * receptive))
        family = "Xavier (tanh/sigmoid)"
    else:
        return []
    with torch.no_grad():
        actual = float(weight.detach().float().std())  # once, at attach: not a training step
    ratio = actual / expected
    if ratio > INIT_TOO_LARGE or ratio < INIT_TOO_SMALL:
        op, threshold = (">", INIT_TOO_LARGE) if ratio > INIT_TOO_LARGE else ("<", INIT_TOO_SMALL)
        return [
            _alert(
                "init_mismatch",
                name,
                "warning",
                "init_scale_ratio",
                ratio,
                op,
                threshold,
                0,
                f"weight std {actual:.3g} is {ratio:.3g}x the {family} scale {expected:.3g}",
            )
        ]
    return []


def _readable(weight: Any) -> bool:
    """Whether a weight has values to measure: a materialised floating-point tensor with at
    least one row and one input (``Linear(0, 4)``, ``Conv2d(3, 0, 3)`` have none) that is not
    on the meta device (no data there)."""
    return (
        isinstance(weight, Tensor)
        and not isinstance(weight, nn.parameter.UninitializedParameter)
        and weight.dim() >= 2
        and weight.numel() > 1  # one value has no std (and Linear(0, 4) none at all)
        and weight.is_floating_point()
        and not weight.is_meta
    )


def loss_input_check(
    loss_fn: nn.Module, report: Callable[[Alert], None], step: Callable[[], int], on_error: OnError
) -> Callable[[nn.Module, Any], None]:
    """A one-shot forward pre-hook for the loss: are its inputs already probabilities?

    It reads two booleans back from the device once, on the first loss call whose input has
    values (an empty batch or a meta tensor waits for the next call); a failure is reported to
    ``on_error`` and never reaches the loss.
    """
    done = False

    def hook(module: nn.Module, args: Any) -> None:
        nonlocal done
        x = args[0] if not done and args else None
        if not isinstance(x, Tensor) or x.numel() == 0 or x.is_meta or not x.is_floating_point():
            return
        done = True
        try:
            found = _probabilities(module, x.detach().float())
        except Exception as exc:  # contained like a hook: the loss goes on
            on_error("(model check) double_softmax", exc)
            return
        if found is not None:
            report(
                _alert(
                    "double_softmax",
                    None,
                    "critical",
                    "loss_input_is_probability",
                    1,
                    "==",
                    1,
                    step(),
                    f"{type(module).__name__} receives {found}; it expects logits",
                )
            )

    return hook


def _probabilities(loss_fn: nn.Module, x: Tensor) -> str | None:
    """What the loss input looks like when it is probabilities (None: it is not, or this loss
    does not expect logits)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and x.dim() >= 2:
        rows = x.sum(dim=1)
        probs = bool((x.min() >= 0) & ((rows - 1).abs().max() < 1e-3))
        return "softmax probabilities (rows >= 0 summing to 1)" if probs else None
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        probs = bool((x.min() >= 0) & (x.max() <= 1))
        return "sigmoid probabilities (all in [0, 1])" if probs else None
    return None
