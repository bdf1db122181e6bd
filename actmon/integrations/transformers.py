"""Hugging Face: ``Trainer(..., callbacks=[ActmonCallback(config=...)])``.

Attaches at train begin to the Trainer's model and optimizer, ends a monitor step at each
optimizer step (``on_step_end``: after gradient accumulation), asks the Trainer to stop when a
rule with the ``stop`` action fires, and closes at train end. Evaluation runs under ``no_grad``
and is not mixed into training windows.

The Trainer keeps each step's loss to itself, so the callback reads it where the model returns
it: a forward hook on the model takes ``outputs.loss`` of every training micro-batch (a device
scalar, no host read) and the step's loss is what the Trainer logs: the sum of the micro-batch
losses when the model was given ``num_items_in_batch`` (each is already its share of the
step), else their mean. A Trainer whose loss is computed outside the model
(``compute_loss_func``, label smoothing) gives the model no labels: no loss is recorded then,
and that is logged once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import actmon
from actmon.config import load_config
from actmon.monitor import Monitor

log = logging.getLogger("actmon")


class _StepLoss:
    """Adds up the losses a model returns in one optimizer step's training forwards."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.calls = 0
        self.shares = False  # the model was given num_items_in_batch: losses are shares
        self.said_missing = False

    def hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """``register_forward_hook(..., with_kwargs=True)``: (module, args, kwargs, output)."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            if not self.said_missing:
                self.said_missing = True
                log.warning(
                    "actmon: the model returned no loss (the Trainer computes it outside the"
                    " model: compute_loss_func or label smoothing); steps are recorded without"
                    " a loss"
                )
            return
        value = loss.detach().float()
        self.total = value if self.total is None else self.total + value
        self.calls += 1
        self.shares = kwargs.get("num_items_in_batch") is not None

    def take(self) -> Tensor | None:
        """The step's loss, as the Trainer logs it; resets for the next step."""
        total, calls = self.total, self.calls
        self.total, self.calls = None, 0
        if total is None:
            return None
        return total if self.shares else total / calls


class ActmonCallback(TrainerCallback):  # type: ignore[misc]
    """Monitors the model a ``transformers.Trainer`` trains. Bad config fails in ``__init__``."""

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        load_config(config, **overrides)
        self.config, self.overrides = config, overrides
        self.monitor: Monitor | None = None
        self._loss = _StepLoss()
        self._loss_handle: RemovableHandle | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        overrides = dict(self.overrides)
        overrides.setdefault("run_name", args.run_name or "hf-trainer")
        model = kwargs["model"]
        self.monitor = actmon.watch(
            model, optimizer=kwargs.get("optimizer"), config=self.config, **overrides
        )
        self._loss_handle = model.register_forward_hook(self._loss.hook, with_kwargs=True)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is None:
            return
        self.monitor.step(loss=self._loss.take())
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None
        if self.monitor is not None:
            self.monitor.close()
