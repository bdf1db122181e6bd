"""Hugging Face: ``Trainer(..., callbacks=[ActmonCallback(config=...)])``.

Attaches at train begin to the Trainer's model and optimizer, ends a monitor step at each
optimizer step (``on_step_end``: after gradient accumulation), asks the Trainer to stop when a
rule with the ``stop`` action fires, and closes at train end. Evaluation runs under ``no_grad``
and is not mixed into training windows.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import actmon
from actmon.config import load_config
from actmon.monitor import Monitor


class ActmonCallback(TrainerCallback):  # type: ignore[misc]
    """Monitors the model a ``transformers.Trainer`` trains. Bad config fails in ``__init__``."""

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        load_config(config, **overrides)
        self.config, self.overrides = config, overrides
        self.monitor: Monitor | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        overrides = dict(self.overrides)
        overrides.setdefault("run_name", args.run_name or "hf-trainer")
        self.monitor = actmon.watch(
            kwargs["model"], optimizer=kwargs.get("optimizer"), config=self.config, **overrides
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is None:
            return
        self.monitor.step()
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.close()
