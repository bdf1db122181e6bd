"""A Hugging Face Trainer on a tiny GPT-2 built from a config, with the ActmonCallback."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from actmon.integrations.transformers import ActmonCallback  # noqa: E402
from tests.test_models import make_tiny_gpt2  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 16), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, max_steps: int, logging_steps: int) -> transformers.TrainingArguments:
    """CPU training in micro-batches of 2 with gradient accumulation over 2."""
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=logging_steps,
        save_strategy="no",
        disable_tqdm=True,
    )


def test_trainer_steps_are_optimizer_steps(tmp_path):
    model = make_tiny_gpt2()
    callback = ActmonCallback(log_every=2, sample_every=1, sinks={"store": {"enabled": False}})
    args = _args(tmp_path, max_steps=4, logging_steps=100)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[callback]
    )
    trainer.train()
    monitor = callback.monitor
    assert monitor is not None
    assert monitor.step_count == trainer.state.global_step == 4
    snap = monitor.snapshot()
    assert snap.window == (3, 4)
    assert snap.layers["transformer.h.0.mlp.act"].calls == 4  # 2 steps x 2 micro-batches
    assert snap.grad_norm_total is not None
    assert snap.grad_norm_total > 0
    assert monitor.internal_errors_total == 0
    assert not any(m._forward_hooks for m in model.modules())  # closed at train end


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_every_optimizer_steps_loss_reaches_the_monitor_as_the_trainer_logs_it(
    tmp_path, accepts_loss_kwargs
):
    """With gradient accumulation: the sum of the micro-batch shares when the model takes
    num_items_in_batch, else their mean; equal to the Trainer's own logged loss per step."""
    model = make_tiny_gpt2()
    if not accepts_loss_kwargs:
        model.accepts_loss_kwargs = False  # the Trainer then averages micro-batch losses
    callback = ActmonCallback(log_every=3, sample_every=3, sinks={"store": {"enabled": False}})
    args = _args(tmp_path, max_steps=6, logging_steps=1)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(24), callbacks=[callback]
    )
    trainer.train()
    monitor = callback.monitor
    assert monitor is not None
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    recorded = [loss for snap in monitor.history for loss in snap.losses]
    assert len(logged) == len(recorded) == 6
    assert recorded == pytest.approx(logged, rel=1e-5)
    assert all(snap.loss is not None for snap in monitor.history)
    assert not model._forward_hooks  # the loss hook is removed at train end
