"""torch.distributed: who exports what, and the cross-rank reduction of a window.

Each rank summarises its own batches into its own device buffers; nothing crosses ranks on a
training step. What happens at a window's flush depends on ``config.distributed``:

``reduce`` (default)
    The aggregator hands the window to a :class:`Reducer` before its device-to-host copy. The
    reducer combines every rank's buffers with collectives whose number does not depend on the
    number of layers (see :meth:`Reducer.reduce`): three per window, four in a window where
    ranks hold their per-unit buffers in different orders. It uses ``all_reduce``, so every
    rank gets the same window: rules, alerts and ``should_stop`` agree on every rank (a "stop"
    rule stops them all together), and only rank 0 runs sinks.
``per_rank``
    No collective at flushes: each rank exports its own view, labelled ``rank`` (Prometheus
    label and Pushgateway grouping key; store and TensorBoard under ``rank<N>``).

Neither applies without an initialised process group of more than one rank.

How each statistic combines across ranks in ``reduce`` mode:

* counts, sums and histograms (element counts, forward calls, moments, zero / saturation
  counts, softmax sums, NaN/Inf counts, output-gradient sums of squares): SUM, so the window
  describes the concatenation of every rank's batches (``calls`` counts every rank's calls);
* maxima and negated minima: MAX;
* per-unit maxima: MAX, so a unit counts as active when it was active on any rank and is dead
  only when it was dead on every rank;
* ``steps_with_data`` and ``grad_steps``: MAX (sampled steps per rank), so averages over steps
  stay averages over steps;
* the per-batch dead share (``dead_fraction_batch``): the mean, over every rank's sampled
  batches, of the share of units dead in that rank's batch. A batch here is one rank's local
  batch, not the global one: making it global would need a collective on every step;
* parameter norms: each rank squares the norms of its local part of each parameter (the local
  shard of an FSDP2 ``DTensor``, the whole tensor otherwise), and the squares are summed over
  ranks with weight ``1/replicas``: a plain tensor is taken to be replicated on every rank
  (DDP: identical gradients after the all-reduce) and so counts once; a sharded DTensor's shards
  add up to the global norm (HSDP: each shard counted once). The same holds for the total
  gradient norm of each step; per-parameter step counts are averaged over ranks;
* the loss of each step: the mean over the ranks that reported one;
* the first non-finite output: for each step and layer, the earliest call position (forward
  execution order) at which any rank saw a NaN or Inf; the first offender is the earliest of
  those in the earliest step;
* the GradScaler's skipped-step flags stay each rank's own (under DDP every rank's scaler sees
  the same all-reduced gradients and skips the same steps).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from actmon.aggregate import RANK_REDUCTION, HostCounts
from actmon.errors import ConfigError, MonitorStateError

if TYPE_CHECKING:
    from actmon.aggregate import Aggregator

Mode = Literal["reduce", "per_rank"]

_NO_CALL = 2.0**40  # "no non-finite call" in the per-(step, layer) earliest-call table


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group the monitor works with."""

    group: Any  # torch.distributed.ProcessGroup, or None for the default group
    mode: Mode
    rank: int  # in ``group``
    world: int
    local_rank: int  # on this machine (``LOCAL_RANK`` as torchrun sets it, else ``rank``)

    @property
    def exports(self) -> bool:
        """Whether this rank runs sinks: every rank in per-rank mode, rank 0 in reduce mode."""
        return self.mode == "per_rank" or self.rank == 0

    @property
    def label(self) -> int | None:
        """The ``rank`` label of this rank's exports (per-rank mode only)."""
        return self.rank if self.mode == "per_rank" else None

    def same_on_all_ranks(self, value: str) -> str:
        """Rank 0's ``value`` on every rank (one broadcast, at watch())."""
        import torch.distributed as dist

        box: list[Any] = [value]
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(box, src=src, group=self.group)
        return str(box[0])


def context(mode: Mode, group: Any = None) -> DistContext | None:
    """The distributed context, or None in a single process (no group, or one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ConfigError(
                "watch(process_group=...): torch.distributed is not initialised; call"
                " torch.distributed.init_process_group() first, or leave process_group out"
            )
        return None
    world = dist.get_world_size(group)
    if world <= 1:
        return None
    rank = dist.get_rank(group)
    if rank < 0:
        raise ConfigError(
            f"watch(process_group=...): global rank {dist.get_rank()} is not a member of the"
            " given process group; pass a group this rank belongs to, or leave process_group out"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return DistContext(group, mode, rank, world, local_rank)


def param_weights(params: Sequence[Tensor], world: int) -> np.ndarray:
    """Per parameter: the weight of one rank's squared local norm in the global squared norm,
    ``1 / replicas`` (see the module docstring)."""
    weights = np.full(len(params), 1.0 / world)
    dtensor = _dtensor_type()
    for i, p in enumerate(params):
        if dtensor is not None and isinstance(p, dtensor):
            mesh, shards = cast(Any, p).device_mesh, 1
            for dim, placement in enumerate(cast(Any, p).placements):
                if not placement.is_replicate():  # Shard / Partial: the ranks hold parts
                    shards *= mesh.size(dim)
            weights[i] = shards / world
    return weights


def _dtensor_type() -> type | None:
    """The DTensor class if it was imported (no DTensor can exist before), without importing
    it: that costs half a second."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def has_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2 ``fully_shard``, tensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor's local part: a DTensor's ``to_local()`` (no communication), else itself."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [cast(Any, t).to_local() if isinstance(t, dtensor) else t for t in tensors]


# Host counters: how each combines over ranks (see the module docstring).
_HOST_SUM = ("count", "calls", "softmax_rows", "steps_with_data")
_HOST_MAX = ("steps_with_data", "grad_steps")
_HOST_MEAN = ("param_steps", "update_steps")
_HEADER = ("layers", "parameters", "steps", "last step", "linear bins", "units", "unit layout")


class Reducer:
    """Reduces each window over the ranks of a process group (``reduce`` mode)."""

    def __init__(
        self,
        ctx: DistContext,
        weights: np.ndarray,
        device: torch.device,
        zero: tuple[str, ...] = (),
    ) -> None:
        self.ctx = ctx
        self.weights = weights  # per parameter, see param_weights()
        self.device = device  # where buffers go when no tensor was seen before the first flush
        # Buffers the config keeps at zero on every rank (output-gradient histograms when they
        # are off): not sent, which halves what a window moves by default.
        self.zero = zero
        self._perm: dict[tuple[Any, ...], tuple[Tensor, np.ndarray]] = {}

    @staticmethod
    def default_device(group: Any = None) -> torch.device:
        """The device collectives of ``group`` run on: the current CUDA device under NCCL."""
        import torch.distributed as dist

        if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce(self, tensor: Tensor, op: str) -> None:
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=reduce_op, group=self.ctx.group)

    def reduce(
        self, agg: Aggregator, last_step: int, steps: int
    ) -> tuple[dict[str, np.ndarray], HostCounts, list[tuple[int, list[int], np.ndarray]]]:
        """The window reduced over every rank, on the host: the arrays of
        :class:`~actmon.aggregate.WindowData` by field name, its host counts and its
        ``call_nonfinite``. Collectives, each on one packed float64 vector:

        1. MAX of a fixed-size header (sizes, step, unit layout) and its negation: every rank
           checks that all agree, and all raise together (no hang) when they do not;
        2. only when the unit layouts differ: MAX of the units per layer, to lay every rank's
           per-unit buffer out in layer order (layers a rank has not run yet are added to it);
        3. SUM of every summed statistic, the host counters and the loss / squared norm sentinel;
        4. MAX of every maximum (negated minima, per-unit maxima, per-step earliest non-finite
           call as its negation) and the per-rank step counters.

        Then one device-to-host copy.
        """
        assert agg.device is not None
        device = agg.device
        f64 = torch.float64
        L, P = agg.n_layers, agg.n_params
        first_step = last_step - steps + 1
        layout = sorted(agg.unit_offsets.items())
        digest = hashlib.blake2b(repr(layout).encode(), digest_size=6).digest()
        header = np.array(
            [L, P, steps, last_step, agg.linear_bins, agg.n_units, int.from_bytes(digest, "big")],
            dtype=np.float64,
        )
        agreed = torch.from_numpy(np.concatenate([header, -header])).to(device)
        self._all_reduce(agreed, "max")
        high, low = np.split(agreed.cpu().numpy(), 2)
        low = -low
        for name, hi, lo in zip(_HEADER[:5], high[:5], low[:5], strict=True):
            if hi != lo:
                raise MonitorStateError(
                    f"actmon: the ranks disagree on the window ending at step {last_step}:"
                    f" {name} range from {lo:.0f} to {hi:.0f} over the ranks; every rank must"
                    " watch the same model with the same config and call step() (and flush())"
                    " the same number of times"
                )
        perm = None
        if high[-1] != low[-1] or high[-2] != low[-2]:  # unit layouts differ between ranks
            perm = self._canonical_units(agg)

        parts = agg.window_parts(missing=0.0)
        host = agg.host
        sentinel = parts["sentinel"].to(f64)
        # Column 1 is this rank's share of the total gradient norm: squares add over ranks.
        sentinel = torch.stack([sentinel[:, 0], sentinel[:, 1].square()], 1)
        given = np.stack([_padded(host.loss_given, steps), _padded(host.grad_given, steps)]).astype(
            np.float64
        )
        host_sum = np.concatenate(
            [getattr(host, n) for n in _HOST_SUM + _HOST_MEAN] + [given.reshape(-1)]
        ).astype(np.float64)
        host_max = np.concatenate([getattr(host, n) for n in _HOST_MAX]).astype(np.float64)
        unit_max = parts["unit_max"]
        if perm is not None:
            canonical = torch.empty_like(unit_max)
            canonical[perm[0]] = unit_max
            unit_max = canonical
        parts["unit_max"] = unit_max
        order = agg.nonfinite_order(first_step, steps, _NO_CALL)

        sent = [n for n in RANK_REDUCTION if n not in self.zero and n != "sentinel"]
        sum_names = [n for n in sent if RANK_REDUCTION[n] == "sum"]
        max_names = [n for n in sent if RANK_REDUCTION[n] == "max"]
        sum_vec = torch.cat(
            [parts[n].reshape(-1).to(f64) for n in sum_names]
            + [sentinel.reshape(-1), torch.from_numpy(host_sum).to(device)]
        )
        max_vec = torch.cat(
            [parts[n].reshape(-1).to(f64) for n in max_names]
            + [order.neg().reshape(-1), torch.from_numpy(host_max).to(device)]
        )
        self._all_reduce(sum_vec, "sum")
        self._all_reduce(max_vec, "max")
        flat = torch.cat([sum_vec, max_vec]).cpu().numpy()  # the one device-to-host copy

        arrays: dict[str, np.ndarray] = {}
        offset = 0

        def take(shape: tuple[int, ...]) -> np.ndarray:
            nonlocal offset
            n = int(np.prod(shape))
            out = flat[offset : offset + n].reshape(shape)
            offset += n
            return out

        for n in sum_names:
            arrays[n] = take(tuple(parts[n].shape))
        sentinel_sum = take((steps, 2))
        counters = {n: take((L,)) for n in _HOST_SUM}
        counters.update({n: take((P,)) for n in _HOST_MEAN})
        loss_n, grad_n = take((2, steps))
        for n in max_names:
            arrays[n] = take(tuple(parts[n].shape))
        earliest = -take((steps, L))
        maxima = {n: take((L,)) for n in _HOST_MAX}
        assert offset == flat.size
        for n in self.zero:
            arrays[n] = np.zeros(tuple(parts[n].shape))

        if perm is not None:
            arrays["unit_max"] = arrays["unit_max"][perm[1]]
        world = self.ctx.world
        # The per-batch dead count: summed over every rank's batches, rescaled so that
        # snapshot's batch_dead / (units * steps_with_data) is the mean over rank-batches.
        rank_steps = counters["steps_with_data"]
        steps_max = maxima["steps_with_data"]
        arrays["batch_dead"] = np.divide(
            arrays["batch_dead"] * steps_max,
            rank_steps,
            out=np.zeros_like(rank_steps),
            where=rank_steps > 0,
        )
        arrays["param_sq"] = arrays["param_sq"] * self.weights[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(loss_n > 0, sentinel_sum[:, 0] / np.maximum(loss_n, 1), np.nan)
            total = np.where(grad_n > 0, np.sqrt(sentinel_sum[:, 1]), np.nan)
        arrays["sentinel"] = np.stack([loss, total], 1)
        # Counters not listed here (added later) stay this rank's own.
        reduced = replace(
            agg.host,
            count=_ints(counters["count"]),
            calls=_ints(counters["calls"]),
            steps_with_data=_ints(steps_max),
            softmax_rows=_ints(counters["softmax_rows"]),
            grad_steps=_ints(maxima["grad_steps"]),
            param_steps=_ints(counters["param_steps"] / world),
            update_steps=_ints(counters["update_steps"] / world),
            loss_given=[bool(n > 0) for n in loss_n],
            grad_given=[bool(n > 0) for n in grad_n],
        )
        return arrays, reduced, _call_nonfinite(earliest, first_step)

    def _canonical_units(self, agg: Aggregator) -> tuple[Tensor, np.ndarray]:
        """Agree on the units of every layer (one collective) and return the permutation from
        this rank's per-unit buffer to the common layout (layer order), as a device index and
        its host copy. A layer another rank has run, but this one has not, gets its units here."""
        assert agg.device is not None
        units = np.zeros(agg.n_layers)
        for layer, (_, n) in agg.unit_offsets.items():
            units[layer] = n
        agreed = torch.from_numpy(units).to(agg.device)
        self._all_reduce(agreed, "max")
        common = agreed.cpu().numpy().astype(np.int64)
        for found in np.nonzero(common)[0]:
            layer = int(found)
            if layer not in agg.unit_offsets:
                agg.register_units(layer, int(common[layer]))
            elif agg.unit_offsets[layer][1] != common[layer]:
                raise MonitorStateError(
                    f"actmon: layer {layer} has {agg.unit_offsets[layer][1]} units on rank"
                    f" {self.ctx.rank} and {common[layer]} on another; every rank must watch"
                    " the same model"
                )
        key = (tuple(sorted(agg.unit_offsets.items())), tuple(common))
        cached = self._perm.get(key)
        if cached is None:
            starts = np.concatenate([[0], np.cumsum(common)[:-1]])
            perm = np.empty(agg.n_units, dtype=np.int64)
            for layer, (offset, n) in agg.unit_offsets.items():
                perm[offset : offset + n] = np.arange(starts[layer], starts[layer] + n)
            cached = (torch.from_numpy(perm).to(agg.device), perm)
            self._perm[key] = cached
        return cached


def _padded(flags: list[bool], n: int) -> np.ndarray:
    return np.array((list(flags) + [False] * n)[:n], dtype=bool)


def _ints(values: np.ndarray) -> np.ndarray:
    return np.rint(values).astype(np.int64)


def _call_nonfinite(
    earliest: np.ndarray, first_step: int
) -> list[tuple[int, list[int], np.ndarray]]:
    """``WindowData.call_nonfinite`` from the reduced (step, layer) earliest-call table: per step
    with a hit, the layers with a non-finite output in the order their first such call ran."""
    out = []
    for row, calls in enumerate(earliest):
        hit = np.nonzero(calls < _NO_CALL / 2)[0]
        if hit.size:
            layers = [int(layer) for layer in hit[np.argsort(calls[hit], kind="stable")]]
            out.append((first_step + row, layers, np.ones(len(layers))))
    return out
