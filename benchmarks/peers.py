"""What practitioners use today, each covering every leaf module, for side-by-side timing.

A peer is built as ``Peer(model, optimizer)``; the benchmark calls ``after_step(step, loss)``
at the end of each training step (inside the timed region), then ``close()`` and finally
``recorded()``, which returns (count, description) of what the peer actually wrote, read back
where it wrote it (event files, the wandb run file) where that is possible. A count of 0 voids
the comparison: nothing is compared to a monitor that silently did nothing.

Optional peers (wandb, fastai) come with ``pip install -e '.[bench]'`` (see the Makefile's
bench target); :func:`available` says which are missing and why, and the benchmark skips them.
"""

from __future__ import annotations

import importlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]


def _tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


def _float_output(output: Any) -> Tensor | None:
    t = _tensor(output)
    if t is None or not t.is_floating_point() or t.numel() == 0:
        return None
    return t


class _HookPeer:
    """A peer made of hooks it registers itself: nothing to do after a step, hooks out at close."""

    handles: list[Any]

    def after_step(self, step: int, loss: Tensor) -> None:
        pass

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class ItemHooks(_HookPeer):
    """The hand-rolled approach: mean/std/zero-fraction/min/max with .item() per layer, plus
    per-parameter gradient norms with .item() before the optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.rows, self.grad_rows = model, 0, 0
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in _leaves(model)]
        self.handles.append(optimizer.register_step_pre_hook(self._grad_norms))
        self.stats: dict[str, dict[str, float]] = {}

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _float_output(output)
            if t is None:
                return
            d = t.detach().float()
            self.stats[name] = {
                "mean": d.mean().item(),
                "std": d.std().item() if d.numel() > 1 else 0.0,
                "zero": (d == 0).float().mean().item(),
                "min": d.min().item(),
                "max": d.max().item(),
            }
            self.rows += 1

        return hook

    def _grad_norms(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                self.stats[f"grad/{name}"] = {"norm": p.grad.norm().item()}
                self.grad_rows += 1

    def recorded(self) -> tuple[int, str]:
        return self.rows, f"{self.rows} layer rows, {self.grad_rows} grad norms (host floats)"


class TensorBoardHistograms(_HookPeer):
    """``SummaryWriter.add_histogram`` of every layer output and output gradient, every step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = tempfile.mkdtemp(prefix="bench-tb-")
        self.writer = SummaryWriter(self.dir)
        self.step = 0
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in _leaves(model)]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _float_output(output)
            if t is None:
                return
            step = self.step
            self.writer.add_histogram(f"act/{name}", t.detach().float(), step)
            if t.requires_grad:
                t.register_hook(
                    lambda g: self.writer.add_histogram(f"grad/{name}", g.detach().float(), step)
                )

        return hook

    def after_step(self, step: int, loss: Tensor) -> None:
        self.step = step + 1
        self.writer.flush()  # its writer thread's work is charged to its own step, not others'

    def close(self) -> None:
        super().close()
        self.writer.close()

    def recorded(self) -> tuple[int, str]:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        counts = {"act": 0, "grad": 0}
        for path in Path(self.dir).glob("events.out.tfevents.*"):
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    kind = value.tag.split("/", 1)[0]
                    if kind in counts:
                        counts[kind] += 1
        total = counts["act"] + counts["grad"]
        return total, (
            f"{counts['act']} activation + {counts['grad']} gradient histograms read back"
            " from the event files"
        )


class HistcReference(_HookPeer):
    """Sync-free reference: a ``torch.histc`` histogram (64 bins on [-8, 8]) of every layer
    output and output gradient, added into device buffers; nothing is read back while training.
    """

    BINS, LOW, HIGH = 64, -8.0, 8.0

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        leaves = _leaves(model)
        device = next(model.parameters()).device
        self.act = torch.zeros(len(leaves), self.BINS, device=device)
        self.grad = torch.zeros(len(leaves), self.BINS, device=device)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(leaves)]

    def _hook(self, i: int) -> Callable[[nn.Module, Any, Any], None]:
        act, grad = self.act[i], self.grad[i]

        def grad_hook(g: Tensor) -> None:
            grad.add_(torch.histc(g.detach().float(), self.BINS, self.LOW, self.HIGH))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _float_output(output)
            if t is None:
                return
            act.add_(torch.histc(t.detach().float(), self.BINS, self.LOW, self.HIGH))
            if t.requires_grad:
                t.register_hook(grad_hook)

        return hook

    def recorded(self) -> tuple[int, str]:
        acts = int((self.act.sum(1) > 0).sum())
        grads = int((self.grad.sum(1) > 0).sum())
        return acts, f"{acts} layers with activation counts, {grads} with gradient counts"


class _WandbRun:
    """One offline wandb run shared by the wandb peers (wandb.watch logs to the global run)."""

    run: Any = None
    users = 0
    counts: dict[str, int] | None = None

    @classmethod
    def acquire(cls) -> Any:
        if cls.run is None:
            import wandb

            os.environ["WANDB_MODE"] = "offline"
            os.environ.setdefault("WANDB_SILENT", "true")
            cls.counts = None
            cls.run = wandb.init(
                dir=tempfile.mkdtemp(prefix="bench-wandb-"),
                mode="offline",
                project="actmon-bench",
                settings=wandb.Settings(console="off"),
            )
        cls.users += 1
        return cls.run

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and cls.run is not None:
            run, cls.run = cls.run, None
            path = run.settings.sync_file
            run.finish()
            cls.counts = _count_wandb_history(Path(path))


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a wandb transaction log (.wandb): a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (crc32, length, type) and a piece of a protobuf."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pieces = chunk
        elif kind == 3:  # middle
            pieces += chunk
        elif kind == 4:  # last
            yield pieces + chunk
            pieces = b""
        elif kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left - 7


def _count_wandb_history(path: Path) -> dict[str, int]:
    """History rows per logged scalar key and histograms per key prefix, read from disk."""
    from wandb.proto import wandb_internal_pb2 as pb

    counts: dict[str, int] = {}
    for data in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if key.endswith("/_type") and "histogram" in item.value_json:
                # "gradients/graph_1<param>/_type": count per watch prefix
                kind, rest = key.split("/", 1)
                prefix = rest[len("graph_")] if rest.startswith("graph_") else "0"
                name = f"hist:{prefix}:{kind}"
                counts[name] = counts.get(name, 0) + 1
            elif not key.startswith("_"):
                counts[f"rows:{key}"] = counts.get(f"rows:{key}", 0) + 1
    return counts


class WandbWatch:
    """``wandb.watch(model, log="all", log_freq=N)`` (parameter and gradient histograms: wandb
    records no activations) and ``wandb.log({"loss": loss.item()})`` every step, offline."""

    log_freq = 1
    idx = 1  # the watch prefix "graph_<idx>" tells the two wandb peers apart in the run file

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.run = _WandbRun.acquire()
        self.model = model
        self.key = f"loss_{self.idx}"
        self.run.watch(model, log="all", log_freq=self.log_freq, idx=self.idx)

    def after_step(self, step: int, loss: Tensor) -> None:
        self.run.log({self.key: loss.item()})

    def close(self) -> None:
        self.run.unwatch(self.model)
        _WandbRun.release()

    def recorded(self) -> tuple[int, str]:
        counts = _WandbRun.counts or {}
        grads = counts.get(f"hist:{self.idx}:gradients", 0)
        params = counts.get(f"hist:{self.idx}:parameters", 0)
        rows = counts.get(f"rows:{self.key}", 0)
        return grads + params, (
            f"{rows} history rows, {params} parameter + {grads} gradient histograms"
            " read back from the offline run file"
        )


class WandbWatchDefault(WandbWatch):
    """wandb.watch at its documented default frequency, log_freq=100."""

    log_freq = 100
    idx = 2


class FastaiActivationStats:
    """fastai's ``ActivationStats(with_hist=True)`` on every leaf module (include_paramless),
    driven by hand the way a Learner drives it: before_fit once, after_batch every step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from fastai.callback.hook import ActivationStats

        self.cb = ActivationStats(with_hist=True, include_paramless=True)
        self.learner = SimpleNamespace(model=model, training=True, train_iter=0)
        self.cb.learn = self.learner
        self.cb.before_fit()

    def after_step(self, step: int, loss: Tensor) -> None:
        self.cb.after_batch()
        self.learner.train_iter += 1

    def close(self) -> None:
        self.cb.after_fit()

    def recorded(self) -> tuple[int, str]:
        steps = len(self.cb.stats)
        hists = sum(
            1
            for row in self.cb.stats
            for layer in row
            if isinstance(layer, dict) and "hist" in layer
        )
        return hists, f"{steps} steps x {len(self.cb.modules)} modules kept, {hists} histograms"


# name -> (class, module it needs, what to install)
PEERS: dict[str, tuple[type, str | None, str]] = {
    "item-hooks": (ItemHooks, None, ""),
    "tb-histogram": (TensorBoardHistograms, "torch.utils.tensorboard", "tensorboard"),
    "wandb-all": (WandbWatch, "wandb", "wandb"),
    "wandb-100": (WandbWatchDefault, "wandb", "wandb"),
    "fastai": (FastaiActivationStats, "fastai.callback.hook", "fastai (pip install --no-deps)"),
    "histc-ref": (HistcReference, None, ""),
}

DESCRIPTIONS = {
    "item-hooks": "hand-written hooks: mean/std/zero-frac/min/max .item() per layer, grad norms",
    "tb-histogram": "SummaryWriter.add_histogram of every layer output and gradient, every step",
    "wandb-all": 'wandb.watch(log="all", log_freq=1), offline; params + grads, no activations',
    "wandb-100": 'wandb.watch(log="all", log_freq=100), offline (wandb 0.31 defaults to 1000)',
    "fastai": "fastai ActivationStats(with_hist=True), every leaf module",
    "histc-ref": "sync-free reference: torch.histc of every activation and gradient",
}


def available(name: str) -> str | None:
    """None when the peer can run here, else why not (the import error, what to install)."""
    _cls, module, install = PEERS[name]
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc} (install {install}, e.g. pip install -e '.[bench]')"
    return None


def make_peer(name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    return PEERS[name][0](model, optimizer)
