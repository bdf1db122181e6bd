"""A real Lightning Trainer on CPU with the ActmonCallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from actmon import store  # noqa: E402
from actmon.integrations.lightning import ActmonCallback  # noqa: E402

# Lightning 2.6 on torch 2.13: "more dataloader workers" hints and its own use of deprecated
# torch pytree APIs; none of them is ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class Net(pl.LightningModule):
    def __init__(self, dead_bias: float | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        if dead_bias is not None:
            with torch.no_grad():
                self.net[0].bias[:24] = dead_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 64, batch: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 2, (n,), generator=gen))
    return DataLoader(data, batch_size=batch)


def _trainer(tmp_path, callback, **kw) -> pl.Trainer:
    logger = pl.loggers.TensorBoardLogger(str(tmp_path / "logs"), name="net")
    return pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2),
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kw,
    )


def test_healthy_module_trains_and_the_store_and_tensorboard_hold_its_windows(tmp_path):
    path = tmp_path / "run.db"
    callback = ActmonCallback(
        log_every=4,
        sample_every=1,
        sinks={"store": {"path": str(path)}, "tensorboard": {"enabled": True}},
    )
    trainer = _trainer(tmp_path, callback)
    trainer.fit(Net(), _loader(), _loader(16))
    monitor = callback.monitor
    assert monitor is not None
    assert monitor.step_count == trainer.global_step == 16
    assert monitor.snapshot().layers["net.1"].calls == 4  # validation forwards not mixed in
    with store.open(path) as db:
        info = db.run()
        assert (info.run, info.status) == ("net-version_0", "finished")
        assert [w.step for w in db.windows()] == [4, 8, 12, 16]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "actmon.dead_fraction/net.1" in scalars  # our event file, in Lightning's directory
    assert "actmon.run/loss" in scalars
    assert "val_loss" in scalars  # Lightning's own
    assert "actmon_grad_norm_total" in trainer.callback_metrics  # logged through the module


def test_a_stop_rule_stops_a_dying_relu_module_at_the_right_step(tmp_path):
    rule = {
        "name": "dead",
        "metric": "dead_fraction",
        "op": ">",
        "threshold": 0.5,
        "severity": "critical",
        "actions": ["stop"],
    }
    callback = ActmonCallback(
        log_every=3, sample_every=1, rules=[rule], sinks={"store": {"enabled": False}}
    )
    trainer = _trainer(tmp_path, callback, max_epochs=5)
    trainer.fit(Net(dead_bias=-100.0), _loader())
    assert trainer.global_step == 3  # stopped at the end of the first window
    assert [(a.rule, a.layer, a.step) for a in callback.monitor.alerts] == [("dead", "net.1", 3)]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    callback = ActmonCallback(log_every=2, sample_every=1, sinks={"store": {"enabled": False}})
    trainer = _trainer(tmp_path, callback, max_epochs=1, accumulate_grad_batches=4)
    trainer.fit(Net(), _loader(n=128))  # 16 batches -> 4 optimizer steps
    monitor = callback.monitor
    assert monitor.step_count == trainer.global_step == 4
    snap = monitor.snapshot()
    assert snap.window == (3, 4)
    assert snap.layers["net.1"].calls == 8  # both steps' 4 micro-batches each


def test_bad_config_fails_in_init():
    import actmon

    with pytest.raises(actmon.ConfigError, match="field 'log_every'"):
        ActmonCallback(log_every=0)


def test_a_raise_rule_ends_fit_with_a_clear_error(tmp_path):
    import actmon

    rule = {
        "name": "dead",
        "metric": "dead_fraction",
        "op": ">",
        "threshold": 0.5,
        "severity": "critical",
        "actions": ["raise"],
    }
    path = tmp_path / "run.db"
    callback = ActmonCallback(
        log_every=2, sample_every=1, rules=[rule], sinks={"store": {"path": str(path)}}
    )
    trainer = _trainer(tmp_path, callback)
    with pytest.raises(actmon.AlertError, match=r"\[critical\] dead on layer 'net.1' at step"):
        trainer.fit(Net(dead_bias=-100.0), _loader())
    assert trainer.global_step == 2
    with store.open(path) as db:
        assert db.run().status == "failed"  # closed by on_exception


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (a GAN-like split of one network)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.b = nn.Linear(16, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = nn.functional.cross_entropy(self.b(self.a(x)), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        return loss

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.a.parameters(), lr=0.05),
            torch.optim.SGD(self.b.parameters(), lr=0.05),
        )


def test_two_optimizers_count_one_step_per_batch(tmp_path):
    callback = ActmonCallback(log_every=4, sample_every=1, sinks={"store": {"enabled": False}})
    trainer = _trainer(tmp_path, callback, max_epochs=1)
    trainer.fit(TwoOptimizers(), _loader())  # 8 batches, 2 optimizer steps each
    monitor = callback.monitor
    assert monitor.step_count == 8
    assert trainer.global_step == 16  # Lightning counts each optimizer's step
    snap = monitor.snapshot()
    assert snap.layers["a.1"].calls == 4
    assert snap.params["a.0.weight"].grad_norm > 0  # both optimizers' parameters are covered
    assert snap.params["b.weight"].grad_norm > 0
    assert monitor.internal_errors_total == 0


def test_lightning_runs_in_different_directories_do_not_collide(tmp_path):
    """Both loggers are net/version_0 (in different directories), and both runs go to one store
    under the working directory: the second claims net-version_0-2, the first is kept."""
    runs = []
    for where in ("a", "b"):
        callback = ActmonCallback(log_every=4, sinks={"store": {"path": "runs/all.db"}})
        _trainer(tmp_path / where, callback, max_epochs=1).fit(Net(), _loader())
        assert callback.monitor is not None
        runs.append(callback.monitor.run)
    assert runs == ["net-version_0", "net-version_0-2"]
    with store.open("runs/all.db") as db:
        assert [(info.run, info.status) for info in db.runs()] == [
            ("net-version_0", "finished"),
            ("net-version_0-2", "finished"),
        ]
        assert [w.step for w in db.windows("net-version_0")] == [4, 8]
        assert [w.step for w in db.windows("net-version_0-2")] == [4, 8]
