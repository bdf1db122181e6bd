"""Lightning: ``Trainer(callbacks=[ActmonCallback(config="configs/default.yaml")])``.

A thin adapter over :class:`actmon.Monitor`: it attaches at fit start to the LightningModule with
the trainer's optimizers, ends a monitor step at each optimizer step (so gradient accumulation
and several optimizers count once per step), stops the trainer when a rule with the ``stop``
action fires, and closes at fit end or on an exception. Validation and test forwards run under
``no_grad`` and are not mixed into training windows.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "actmon.integrations.lightning needs Lightning: pip install 'actmon[lightning]'"
    ) from exc

from torch import Tensor

import actmon
from actmon.config import load_config
from actmon.monitor import Monitor


class ActmonCallback(pl.Callback):
    """Monitors the LightningModule being fit. Bad config fails here, in ``__init__``."""

    def __init__(self, config: Any = None, log_to_module: bool = True, **overrides: Any) -> None:
        load_config(config, **overrides)  # validate now: the error names the field
        self.config, self.overrides, self.log_to_module = config, overrides, log_to_module
        self.monitor: Monitor | None = None
        self._last_global_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        overrides = dict(self.overrides)
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger):  # share the user's run name and directory
            overrides.setdefault("run_name", f"{logger.name}-version_{logger.version}")
            sinks = overrides.setdefault("sinks", {})
            sinks.setdefault("tensorboard", {}).setdefault("log_dir", logger.log_dir)
        # precision="16-mixed" trains with a GradScaler: its skipped steps are counted, and
        # output gradients unscaled (actmon.watch(scaler=...)).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.monitor = actmon.watch(
            pl_module,
            optimizer=list(trainer.optimizers),
            config=self.config,
            scaler=scaler if trainer.optimizers else None,
            **overrides,
        )
        self._last_global_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.monitor is None or trainer.global_step == self._last_global_step:
            return  # a micro-batch of an accumulation: no optimizer step yet
        self._last_global_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        snapshot = self.monitor.step(loss=loss if isinstance(loss, Tensor) else None)
        if self.monitor.should_stop:
            trainer.should_stop = True
        if snapshot is not None and self.log_to_module:
            # Underscored keys: the TensorBoard sink already writes "actmon.run/<metric>" tags.
            values = {f"actmon_{k}": v for k, v in snapshot.run_metrics().items()}
            values["actmon_alerts_active"] = float(len(self.monitor.active_alerts))
            pl_module.log_dict(values, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("finished")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close("failed")

    def _close(self, status: str) -> None:
        if self.monitor is not None:
            self.monitor.close(status)

    def state_dict(self) -> dict[str, Any]:
        return {"last_global_step": self._last_global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_global_step = int(state_dict.get("last_global_step", 0))
