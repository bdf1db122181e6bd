"""One rank of the 2-process gloo group that tests/test_distributed.py launches.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py OUT [GW]

Runs every scenario in turn on CPU and pickles what this rank saw to ``OUT/rank<r>.pkl``
(``GW``: a Pushgateway URL for the per-rank push scenario). The test process computes the
references from the same models and batches (:func:`make_model`, :func:`rank_batches`). A
scenario that fails records its traceback instead of its results. The worker ends with
``destroy_process_group()`` and ``os._exit(0)``: gloo can abort at interpreter exit after DDP.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import actmon

WORLD = 2
STEPS = 6
BATCH = 8
LOG_EVERY = 3
QUIET = {"store": {"enabled": False}, "console": {"enabled": False}}


def make_model() -> nn.Sequential:
    """Linear -> ReLU -> Linear -> Tanh -> Linear -> Softmax, with two chosen ReLU units:
    unit 0 outputs relu(x[:, 0]) (dead on rank 0's batches only, see rank_batches) and unit 1
    is dead on every input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5), nn.Softmax(-1)
    )
    with torch.no_grad():
        model[0].weight[:2] = 0.0
        model[0].weight[0, 0] = 1.0
        model[0].bias[0] = 0.0
        model[0].bias[1] = -1.0
        model[2].weight.mul_(8.0)  # some tanh outputs saturate
    return model


def rank_batches(rank: int) -> list[Tensor]:
    """STEPS batches of this rank: feature 0 is <= 0 on rank 0 and > 0 on rank 1."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 6, generator=gen)
        x[:, 0] = x[:, 0].abs() + 0.1
        if rank == 0:
            x[:, 0] = -x[:, 0]
        out.append(x)
    return out


def loss_of(out: Tensor) -> Tensor:
    return out.pow(2).sum(-1).mean()


class CountCollectives:
    """Counts calls of torch.distributed's Python collectives while active."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "reduce",
        "reduce_scatter_tensor",
        "gather",
        "scatter",
        "all_to_all_single",
        "barrier",
    )

    def __init__(self) -> None:
        self.calls = 0
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> CountCollectives:
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args: Any, _original: Callable[..., Any] = original, **kw: Any) -> Any:
                self.calls += 1
                return _original(*args, **kw)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def reduce_ddp(rank: int) -> dict[str, Any]:
    """DDP, reduce mode, SGD with lr=0 (the parameters stay those of make_model(), so a
    single-process run over every rank's batches sees the same activations)."""
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
    averaged: list[dict[str, float]] = []  # per step, plain norms of DDP's averaged gradients
    opt.register_step_pre_hook(
        lambda o, a, k: averaged.append(
            {n: float(p.grad.norm()) for n, p in model.named_parameters()}
        )
    )
    mon = actmon.watch(
        ddp,
        opt,
        run_name="reduce",
        log_every=LOG_EVERY,
        sample_every=1,
        sinks={"console": {"enabled": False}},
    )
    collectives, snapshots = [], []
    for x in rank_batches(rank):
        loss = loss_of(ddp(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
        with CountCollectives() as count:
            snap = mon.step(loss=loss)
        collectives.append(count.calls)
        if snap is not None:
            snapshots.append(snap)
    sinks = sorted(mon.sinks)
    mon.close()
    return {
        "snapshots": snapshots,
        "collectives": collectives,
        "averaged": averaged,
        "sinks": sinks,
    }


def collectives_deep(rank: int) -> dict[str, Any]:
    """A 24-layer model without DDP, sampling every 2nd step: collectives per monitor.step()."""
    torch.manual_seed(1)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(8, 8), nn.ReLU())])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = actmon.watch(model, opt, log_every=LOG_EVERY, sample_every=2, sinks=QUIET)
    counts = []
    for _ in range(STEPS):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        with CountCollectives() as count:
            mon.step(loss=loss)
        counts.append(count.calls)
    layers = len(mon.layers)
    mon.close()
    return {"collectives": counts, "layers": layers}


def ddp_no_optimizer(rank: int) -> dict[str, Any]:
    """DDP without an optimizer: norms are taken at the end of backward, after DDP averaged."""
    model = make_model()
    local = make_model()  # the same weights, no DDP: this rank's own gradients
    ddp = DDP(model)
    mon = actmon.watch(ddp, log_every=1, sample_every=1, sinks=QUIET)
    averaged, own, snapshots = [], [], []
    for x in rank_batches(rank)[:2]:
        loss_of(ddp(x)).backward()
        loss_of(local(x)).backward()
        averaged.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
        own.append({n: float(p.grad.norm()) for n, p in local.named_parameters()})
        snapshots.append(mon.step())
        ddp.zero_grad()
        local.zero_grad()
    mon.close()
    return {"averaged": averaged, "own": own, "snapshots": snapshots}


class Scale(nn.Module):
    """Multiplies by a settable factor (NaN poisons its output on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def nonfinite(rank: int) -> dict[str, Any]:
    """Step 2: rank 1's input holds a NaN (layer "0" is the first to go non-finite); rank 0's
    Scale layer "2" turns NaN. Over both ranks the first offender is layer "0"."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Scale(), nn.Linear(4, 2))
    mon = actmon.watch(model, log_every=LOG_EVERY, sample_every=1, sinks=QUIET)
    for step in (1, 2, 3):
        x = torch.randn(3, 4)
        model[2].factor = 1.0
        if step == 2 and rank == 1:
            x[0, 0] = float("nan")
        if step == 2 and rank == 0:
            model[2].factor = float("nan")
        model(x)
        snap = mon.step()
    mon.close()
    return {"snapshot": snap}


class Branchy(nn.Module):
    """Linear -> ReLU -> [branch: Linear -> ReLU, run when ``use_branch``] -> Linear -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.inp, self.act = nn.Linear(4, 8), nn.ReLU()
        self.branch = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
        self.out, self.act2 = nn.Linear(8, 3), nn.ReLU()
        self.use_branch = False
        with torch.no_grad():
            self.branch[0].bias[:2] = -100.0  # branch units 0 and 1 are dead

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        if self.use_branch:
            h = h + self.branch(h).sum(-1, keepdim=True)
        return self.act2(self.out(h))


def branch_inputs(rank: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(5, 4, generator=gen) for _ in range(STEPS)]


def uneven(rank: int) -> dict[str, Any]:
    """The branch runs on rank 1 only in the first window and on both in the second: the ranks
    discover the branch's units in different windows and hold them in different orders."""
    model = Branchy()
    mon = actmon.watch(model, log_every=LOG_EVERY, sample_every=1, sinks=QUIET)
    snapshots, counts = [], []
    for step, x in enumerate(branch_inputs(rank)):
        model.use_branch = rank == 1 or step >= LOG_EVERY
        model(x).pow(2).mean().backward()
        with CountCollectives() as count:
            snap = mon.step()
        counts.append(count.calls)
        if snap is not None:
            snapshots.append(snap)
    offsets = dict(mon._aggregator.unit_offsets)
    mon.close()
    return {"snapshots": snapshots, "collectives": counts, "offsets": offsets}


def mismatch(rank: int) -> dict[str, Any]:
    """Ranks with different configs: every rank raises at the flush (none hangs)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())
    bins = {"linear_bins": 8 if rank == 0 else 16}
    mon = actmon.watch(model, log_every=1, histogram=bins, strict=True, sinks=QUIET)
    model(torch.randn(2, 3))
    try:
        mon.step()
    except Exception as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}
    finally:
        mon.close()
    return {"raised": None}


def _get(url: str, needle: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            if needle in text:
                return str(text)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle!r} not at {url}")
        time.sleep(0.1)


def per_rank(rank: int, gateway: str | None) -> dict[str, Any]:
    """per_rank mode: every sink on every rank (run name left to the default)."""
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
    sinks = {
        "console": {"enabled": False},
        "tensorboard": {"enabled": True},
        "prometheus": {"enabled": True, "port": 0},
    }
    mon = actmon.watch(
        ddp, opt, distributed="per_rank", log_every=LOG_EVERY, sample_every=1, sinks=sinks
    )
    for x in rank_batches(rank)[:LOG_EVERY]:
        loss = loss_of(ddp(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
        snap = mon.step(loss=loss)
    assert mon.prometheus_url is not None
    text = _get(mon.prometheus_url, f'actmon_step{{rank="{rank}"')
    out = {"run": mon.run, "snapshot": snap, "exposition": text, "sinks": sorted(mon.sinks)}
    mon.close()
    if gateway is not None:
        push = {
            "console": {"enabled": False},
            "store": {"enabled": False},
            "prometheus": {"enabled": True, "mode": "pushgateway", "pushgateway_url": gateway},
        }
        model = make_model()
        with actmon.watch(
            model, run_name="pushed", distributed="per_rank", log_every=1, sinks=push
        ) as mon:
            model(rank_batches(rank)[0])
            mon.step()
    return out


def fsdp(rank: int) -> dict[str, Any]:
    """FSDP2 fully_shard on CPU: the monitor's norms against DTensor.full_tensor() norms."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch before 2.6 has it under torch.distributed._composable
        return {
            "skipped": f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard"
            f" ({exc})"
        }

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))  # the default mesh is CUDA's where a GPU exists

    def sharded() -> nn.Sequential:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def full(model: nn.Module, grads: bool) -> dict[str, Tensor]:
        return {
            n: (p.grad if grads else p.detach()).full_tensor().clone()
            for n, p in model.named_parameters()
        }

    model = sharded()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before: list[dict[str, Tensor]] = []
    after: list[dict[str, Tensor]] = []
    grads: list[dict[str, Tensor]] = []

    def pre_step(*_: Any) -> None:
        grads.append(full(model, True))
        before.append(full(model, False))

    opt.register_step_pre_hook(pre_step)
    opt.register_step_post_hook(lambda *_: after.append(full(model, False)))
    mon = actmon.watch(model, opt, log_every=1, sample_every=1, sinks=QUIET)
    snapshots = []
    for x in rank_batches(rank)[:2]:
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        snapshots.append(mon.step(loss=loss))
    local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    mon.close()

    model = sharded()  # without an optimizer: the end-of-backward path
    mon = actmon.watch(model, log_every=1, sample_every=1, sinks=QUIET)
    model(rank_batches(rank)[0]).pow(2).mean().backward()
    no_opt_grads = full(model, True)
    no_opt = mon.step()
    mon.close()
    return {
        "snapshots": snapshots,
        "grads": grads,
        "before": before,
        "after": after,
        "local_shapes": local_shapes,
        "no_opt": no_opt,
        "no_opt_grads": no_opt_grads,
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    gateway = sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "reduce": lambda: reduce_ddp(rank),
        "deep": lambda: collectives_deep(rank),
        "no_optimizer": lambda: ddp_no_optimizer(rank),
        "nonfinite": lambda: nonfinite(rank),
        "uneven": lambda: uneven(rank),
        "mismatch": lambda: mismatch(rank),
        "per_rank": lambda: per_rank(rank, gateway),
        "fsdp": lambda: fsdp(rank),
    }
    for name, scenario in scenarios.items():
        start = time.perf_counter()
        try:
            results[name] = scenario()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], flush=True)
        print(f"rank {rank}: {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        dist.barrier()
    with open(out_dir / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
