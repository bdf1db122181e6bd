"""Model checks run once, at attach and on the first loss call: mistakes visible before training.

* ``double_softmax`` — probabilities fed to a loss that expects logits (CrossEntropyLoss after a
  softmax, BCEWithLogitsLoss after a sigmoid), seen from the loss input when ``loss_fn`` is given,
  else from a Softmax as the model's last layer.
* ``saturating_hidden_stack`` — three or more sigmoid/tanh hidden layers: gradients vanish.
* ``init_mismatch`` — a Linear/Conv feeding an activation with a weight scale more than 10x
  above or 20x below what that activation's standard init (Kaiming / Xavier) gives.
"""

from __future__ import annotations

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


def attach_checks(model: nn.Module, has_loss_fn: bool) -> list[Alert]:
    """Structural checks on the model as watched (step 0)."""
    from actmon.attach import named_modules  # layer names without DDP / compile prefixes

    leaves = [
        (name or "(root)", m)
        for name, m in named_modules(model)
        if not any(True for _ in m.children())
    ]
    kinds = [(name, classify(m).kind, m) for name, m in leaves]
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
    if not has_loss_fn and kinds and kinds[-1][1] is Kind.SOFTMAX:
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
    alerts.extend(_init_checks(kinds))
    return alerts


def _init_checks(kinds: list[tuple[str, Kind, nn.Module]]) -> list[Alert]:
    alerts = []
    for (name, _, module), (_, next_kind, _) in itertools.pairwise(kinds):
        weight = getattr(module, "weight", None)
        if (
            not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            or not isinstance(weight, Tensor)
            or weight.dim() < 2
        ):
            continue
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        if next_kind in (Kind.RELU, Kind.LEAKY, Kind.SMOOTH_GATED):
            expected, family = math.sqrt(2.0 / fan_in), "Kaiming (ReLU-like)"
        elif next_kind in (Kind.SIGMOID, Kind.TANH):
            receptive = weight[0, 0].numel()
            expected = math.sqrt(2.0 / (fan_in + fan_out * receptive))
            family = "Xavier (tanh/sigmoid)"
        else:
            continue
        with torch.no_grad():
            actual = float(weight.detach().float().std())  # once, at attach: not a training step
        ratio = actual / expected
        if ratio > INIT_TOO_LARGE or ratio < INIT_TOO_SMALL:
            op, threshold = (
                (">", INIT_TOO_LARGE) if ratio > INIT_TOO_LARGE else ("<", INIT_TOO_SMALL)
            )
            alerts.append(
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
            )
    return alerts


def loss_input_check(
    loss_fn: nn.Module, report: Callable[[Alert], None], step: Callable[[], int]
) -> Callable[[nn.Module, Any], None]:
    """A one-shot forward pre-hook for the loss: are its inputs already probabilities?

    It reads two booleans back from the device once, on the first loss call only.
    """
    done = False

    def hook(module: nn.Module, args: Any) -> None:
        nonlocal done
        if done or not args or not isinstance(args[0], Tensor):
            return
        done = True
        x = args[0].detach().float()
        if isinstance(module, nn.CrossEntropyLoss) and x.dim() >= 2:
            rows = x.sum(dim=1)
            probs = bool((x.min() >= 0) & ((rows - 1).abs().max() < 1e-3))
            what = "softmax probabilities (rows >= 0 summing to 1)"
        elif isinstance(module, nn.BCEWithLogitsLoss):
            probs = bool((x.min() >= 0) & (x.max() <= 1))
            what = "sigmoid probabilities (all in [0, 1])"
        else:
            return
        if probs:
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
                    f"{type(module).__name__} receives {what}; it expects logits",
                )
            )

    return hook
