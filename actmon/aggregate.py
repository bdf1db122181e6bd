"""The aggregator: preallocated device buffers that fold per-call statistics into windows.

Hooks write each call's fixed-size results into per-step slot rows (``out=``, no copy) and hand
over the variable-size parts (histograms, per-unit maxima). At the end of a sampled step the
slots are folded into window buffers with a constant number of ``index_add_`` /
``scatter_reduce_`` calls, whatever the number of layers. On a CPU the fused kernels add a
call into the layer's window rows in place instead (:meth:`Aggregator.forward_addresses`,
:meth:`Aggregator.backward_addresses`), so nothing is left to fold for those calls; the call
order and each call's non-finite count are still kept. On a GPU the Triton backend does the
same with one launch per call (``actmon.triton_backend``), given views of the rows instead of
addresses, and adds each call's non-finite count into a device vector by call position. At
the end of a window everything is packed into one float64 vector and copied to the host once
(:meth:`Aggregator.flush`).

Each buffer declares how it reduces: SUM (counts, sums, histograms), MAX (maxima; minima are
stored negated so they fold with the same amax), which is what a cross-rank reduction needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from actmon import stats, triton_backend

if TYPE_CHECKING:
    from actmon.distributed import Reducer

_NEG_INF = float("-inf")

# How each window buffer combines across ranks (actmon.distributed packs one vector per kind),
# by WindowData field name, in WindowData's order. The sentinel holds the loss (mean over
# ranks) and each rank's share of the total gradient norm (squares summed).
RANK_REDUCTION: dict[str, str] = {
    "act_sum": "sum",
    "act_max": "max",
    "act_count": "sum",
    "act_hist": "sum",
    "lin_hist": "sum",
    "unit_max": "max",  # MAX of "ever > 0": a unit is dead only if dead on every rank
    "batch_dead": "sum",
    "grad_sum": "sum",
    "grad_max": "max",
    "grad_hist": "sum",
    "param_sq": "sum",  # weighted by 1/replicas: see actmon.distributed
    "sentinel": "sum",
}


@dataclass
class WindowData:
    """One window's raw statistics on the host (numpy), before any derived metric."""

    first_step: int
    last_step: int
    sampled_steps: list[int]
    act_sum: np.ndarray  # (L, 4) float64: sum, sumsq, softmax max-prob sum, softmax entropy sum
    act_max: np.ndarray  # (L, 2): max, -min
    act_count: np.ndarray  # (L, 2): nonzero, saturated
    act_hist: np.ndarray  # (L, 2048) raw symlog counts
    lin_hist: np.ndarray  # (L, linear_bins + 1); last bin NaN
    unit_max: np.ndarray  # (U,) per-unit max over the window
    batch_dead: np.ndarray  # (L,) units never > 0 in a step, summed over sampled steps
    grad_sum: np.ndarray  # (L, 3): sum of squares, non-finite and NaN counts of output gradients
    grad_max: np.ndarray  # (L, 2): max, -min of output gradients
    grad_hist: np.ndarray  # (L, 2048)
    param_sq: np.ndarray  # (P, 3): grad norm^2, weight norm^2, update norm^2 summed over steps
    sentinel: np.ndarray  # (steps in window, 2): loss, total gradient norm (NaN where not given)
    call_nonfinite: list[
        tuple[int, list[int], np.ndarray]
    ]  # (step, layer per call, count per call)
    host: HostCounts


@dataclass
class HostCounts:
    """Counters known on the host from shapes alone (no device read needed)."""

    count: np.ndarray  # (L,) elements summarised
    calls: np.ndarray  # (L,) forward calls summarised
    steps_with_data: np.ndarray  # (L,) sampled steps in which the layer ran
    softmax_rows: np.ndarray  # (L,)
    grad_steps: np.ndarray  # (L,) sampled steps with an output gradient
    param_steps: np.ndarray  # (P,) sampled steps with a gradient for the parameter
    update_steps: np.ndarray  # (P,) sampled steps with an update measured
    loss_given: list[bool] = field(default_factory=list)  # per step of the window
    grad_given: list[bool] = field(default_factory=list)
    amp_skipped: list[bool] = field(default_factory=list)  # per step, with a GradScaler only

    def grow_layers(self, layers: int) -> None:
        """Pad the per-layer counters with zeros up to ``layers`` entries."""
        for name in ("count", "calls", "steps_with_data", "softmax_rows", "grad_steps"):
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.zeros(layers - len(old), np.int64)]))

    @classmethod
    def zeros(cls, layers: int, params: int) -> HostCounts:
        def z(n: int) -> np.ndarray:
            return np.zeros(n, dtype=np.int64)

        return cls(
            count=z(layers),
            calls=z(layers),
            steps_with_data=z(layers),
            softmax_rows=z(layers),
            grad_steps=z(layers),
            param_steps=z(params),
            update_steps=z(params),
        )


Row = tuple[Tensor, ...]  # 0-d views into one slot row: kernels write each with ``out=``


class _Slots:
    """Per-step rows that calls write into; grown (rarely) when a step has more calls.

    The 0-d views of every row are made once, when the rows are allocated: making them per
    call would cost a dispatcher call per statistic on the hot path.
    """

    def __init__(self, widths: dict[str, tuple[int, torch.dtype]], device: torch.device) -> None:
        self.widths = widths
        self.device = device
        self.capacity = 0
        self.rows: dict[str, Tensor] = {}
        self.views: list[tuple[Row, ...]] = []
        self.layers: list[int] = []
        self._grow(64)

    def _grow(self, capacity: int) -> None:
        new = {
            name: torch.zeros(capacity, width, dtype=dtype, device=self.device)
            for name, (width, dtype) in self.widths.items()
        }
        for name, old in self.rows.items():
            new[name][: self.capacity].copy_(old)
        self.rows, self.capacity = new, capacity
        self.views = [
            tuple(tuple(self.rows[name][n].unbind(0)) for name in self.widths)
            for n in range(capacity)
        ]

    def next_rows(self) -> tuple[Row, ...]:
        n = len(self.layers)
        if n == self.capacity:
            self._grow(2 * self.capacity)
        return self.views[n]

    def used(self, name: str) -> Tensor:
        return self.rows[name][: len(self.layers)]


class Aggregator:
    """Owns the window buffers of one monitor; see the module docstring for the data flow."""

    def __init__(self, n_layers: int, n_params: int, linear_bins: int, log_every: int) -> None:
        self.n_layers = n_layers
        self.n_params = n_params
        self.linear_bins = linear_bins
        self.log_every = log_every
        self.device: torch.device | None = None
        self.on_cpu = False  # buffers on the CPU: the fused kernels may add into them in place
        self._addresses: dict[tuple[int, bool], tuple[Any, ...]] = {}  # by (layer, units/hist)
        self.device_rows = False  # in-place calls go to the device backend (views, not addresses)
        self._call_counts: Tensor | None = None  # device backend: non-finite count per call
        self.unit_offsets: dict[int, tuple[int, int]] = {}  # layer -> (offset, units)
        self.n_units = 0
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._unit_index_cache: dict[tuple[int, ...], Tensor] = {}
        self._pending_units: list[tuple[int, Tensor]] = []
        self._pending_hist: list[Tensor] = []
        self._pending_lin: list[tuple[int, Tensor]] = []
        self._pending_grad_hist: list[Tensor] = []
        # The step's forward calls in order: (layer, its non-finite count when the fused kernels
        # added it into the window directly, None when it is in a slot row).
        self._calls: list[tuple[int, int | None]] = []
        self._units_written = False  # a direct call wrote the step's per-unit maxima
        self._grad_layers_this_step: set[int] = set()
        self._layers_this_step: set[int] = set()
        self._call_nonfinite: list[tuple[int, list[int], Tensor]] = []
        self._step_values: list[tuple[Tensor | None, Tensor | None]] = []  # per step
        self.host = HostCounts.zeros(n_layers, n_params)
        self.sampled_steps: list[int] = []
        self.first_step: int | None = None
        self.reducer: Reducer | None = None  # set under torch.distributed ("reduce" mode)
        self.skip_parts: tuple[str, ...] = ()  # buffers never written (set by the monitor)
        self._dirty = False  # whether any buffer but the sentinel was written this window

    # ---- buffers -------------------------------------------------------------------------
    def ensure_device(self, device: torch.device) -> None:
        """Allocate every buffer on ``device`` at the first summarised tensor."""
        if self.device is not None:
            return
        self.device = device
        self.on_cpu = device.type == "cpu"
        self.device_rows = triton_backend.enabled_for(device)
        L, P = self.n_layers, self.n_params
        f64, f32, i64 = torch.float64, torch.float32, torch.int64
        self.act_sum = torch.zeros(L, len(stats.ACT_SUM_FIELDS), dtype=f64, device=device)
        self.act_max = torch.full((L, 2), _NEG_INF, dtype=f32, device=device)
        self.act_count = torch.zeros(L, 2, dtype=i64, device=device)
        self.act_hist = torch.zeros(L, stats.SYMLOG_BINS, dtype=i64, device=device)
        self.lin_hist = torch.zeros(L, self.linear_bins + 1, dtype=i64, device=device)
        self.unit_max = torch.full((self.n_units,), _NEG_INF, dtype=f32, device=device)
        self.step_unit_max = torch.full((self.n_units,), _NEG_INF, dtype=f32, device=device)
        self.unit_layer = torch.zeros(self.n_units, dtype=i64, device=device)
        self.batch_dead = torch.zeros(L, dtype=f64, device=device)
        self.grad_sum = torch.zeros(L, len(stats.GRAD_SUM_FIELDS), dtype=f64, device=device)
        self.grad_max = torch.full((L, 2), _NEG_INF, dtype=f32, device=device)
        self.grad_hist = torch.zeros(L, stats.SYMLOG_BINS, dtype=i64, device=device)
        self.param_sq = torch.zeros(P, 3, dtype=f64, device=device)
        self._nan = torch.full((), float("nan"), dtype=f32, device=device)
        self.nonfinite_bins = torch.tensor(stats.NONFINITE_BINS, dtype=i64, device=device)
        # Slot layouts are the kernels' field lists (stats.*_FIELDS): one source for both sides.
        self.fwd = _Slots(
            {
                "sums": (len(stats.ACT_SUM_FIELDS), f64),  # moments rebuilt in float64
                "maxes": (len(stats.ACT_MAX_FIELDS), f32),
                "counts": (len(stats.ACT_COUNT_FIELDS), torch.int32),
            },
            device,
        )
        self.bwd = _Slots(
            {
                "sums": (len(stats.GRAD_SUM_FIELDS), f32),
                "maxes": (len(stats.GRAD_MAX_FIELDS), f32),
            },
            device,
        )
        if self.device_rows:
            self._call_counts = torch.zeros(256, dtype=i64, device=device)
        for layer, (offset, units) in self.unit_offsets.items():
            self.unit_layer[offset : offset + units] = layer

    def add_layer(self) -> int:
        """One more layer (a functional activation found while running); returns its index."""
        index = self.n_layers
        self.n_layers += 1
        self.host.grow_layers(self.n_layers)
        self._addresses.clear()  # the buffers are reallocated below
        if self.device is not None:
            for name in (
                "act_sum",
                "act_max",
                "act_count",
                "act_hist",
                "lin_hist",
                "batch_dead",
                "grad_sum",
                "grad_max",
                "grad_hist",
            ):
                old = getattr(self, name)
                fill = _NEG_INF if name in ("act_max", "grad_max") else 0
                row = torch.full((1, *old.shape[1:]), fill, dtype=old.dtype, device=old.device)
                setattr(self, name, torch.cat([old, row]))
        return index

    def register_units(self, layer: int, units: int) -> int:
        """Give ``layer`` a slice of the per-unit buffers; returns its offset."""
        if layer in self.unit_offsets:
            return self.unit_offsets[layer][0]
        offset = self.n_units
        self.unit_offsets[layer] = (offset, units)
        self.n_units += units
        if self.device is not None:  # grow the unit buffers (only while layers are discovered)
            grow = lambda t, fill: torch.cat(  # noqa: E731
                [t, torch.full((units,), fill, dtype=t.dtype, device=self.device)]
            )
            self.unit_max = grow(self.unit_max, _NEG_INF)
            self.step_unit_max = grow(self.step_unit_max, _NEG_INF)
            self.unit_layer = grow(self.unit_layer, layer)
        self._unit_index_cache.clear()
        self._addresses.clear()
        return offset

    # ---- per call (hooks) ----------------------------------------------------------------
    def forward_rows(self) -> tuple[Row, ...]:
        """The next call's slot views: (sums, maxes, counts); see ``stats.summarize_activation``."""
        return self.fwd.next_rows()

    def commit_forward(
        self,
        layer: int,
        numel: int,
        hist: Tensor,
        unit_max: Tensor | None,
        linear: Tensor | None,
        softmax_rows: int,
    ) -> None:
        """Record one forward call whose fixed-size results are already in the current rows."""
        self.fwd.layers.append(layer)
        self._calls.append((layer, None))
        self._pending_hist.append(hist)
        if unit_max is not None:
            self._pending_units.append((layer, unit_max))
        self._count_forward(layer, numel, linear, softmax_rows)

    def forward_addresses(
        self, layer: int, units: bool
    ) -> tuple[int, ...] | triton_backend.ForwardRows:
        """Where the fused CPU kernels add one call of ``layer`` (``stats.accumulate_activation``):
        its rows of act_sum, act_max, act_count and act_hist, and its slice of the step's
        per-unit maxima when ``units`` (else 0). Commit the call with :meth:`commit_direct`.
        Cached until a buffer is reallocated (a layer or units added). With the device backend:
        views of those rows, the linear histogram's row and the call's non-finite slot."""
        self._dirty = True
        if units:
            self._units_written = True
        key = (layer, units)
        if self.device_rows:
            return self._device_forward_rows(key)
        addresses = self._addresses.get(key)
        if addresses is None:
            unit_address = 0
            if units:
                unit_address = _address(self.step_unit_max, self.unit_offsets[layer][0])
            addresses = self._addresses[key] = (
                _address(self.act_sum, layer),
                _address(self.act_max, layer),
                _address(self.act_count, layer),
                _address(self.act_hist, layer),
                unit_address,
            )
        return addresses

    def _device_forward_rows(self, key: tuple[int, bool]) -> triton_backend.ForwardRows:
        layer, units = key
        position = len(self._calls)  # the call being made: committed next
        assert self._call_counts is not None
        if position == self._call_counts.numel():  # more calls in a step than ever: grow
            grown = torch.zeros(2 * position, dtype=torch.int64, device=self.device)
            grown[:position].copy_(self._call_counts)
            self._call_counts = grown
            self._addresses.clear()  # the cached rows hold the old vector
        cached = self._addresses.get(key)
        if cached is None:
            unit_row = None
            if units:
                offset, n = self.unit_offsets[layer]
                unit_row = self.step_unit_max[offset : offset + n]
            cached = self._addresses[key] = triton_backend.ForwardRows(
                self.act_sum[layer],
                self.act_max[layer],
                self.act_count[layer],
                self.act_hist[layer],
                unit_row,
                self.lin_hist[layer],
                self._call_counts,
                0,
            )
        assert isinstance(cached, triton_backend.ForwardRows)
        return cached._replace(position=position)

    def commit_direct(
        self, layer: int, numel: int, nonfinite: int, linear: Tensor | None, softmax_rows: int
    ) -> None:
        """Record one forward call the fused kernels already added into the window."""
        self._calls.append((layer, nonfinite))
        self._count_forward(layer, numel, linear, softmax_rows)

    def commit_empty(self, layer: int) -> None:
        """Record a forward call with an empty batch: the layer ran (so it is listed in the
        window) but added no element."""
        self.host.calls[layer] += 1

    def _count_forward(
        self, layer: int, numel: int, linear: Tensor | None, softmax_rows: int
    ) -> None:
        if linear is not None:
            self._pending_lin.append((layer, linear))
        host = self.host
        host.count[layer] += numel
        host.calls[layer] += 1
        host.softmax_rows[layer] += softmax_rows
        if layer not in self._layers_this_step:
            self._layers_this_step.add(layer)
            host.steps_with_data[layer] += 1

    def backward_rows(self) -> tuple[Row, ...]:
        """The next gradient call's slot views: (sums, maxes)."""
        return self.bwd.next_rows()

    def commit_backward(self, layer: int, numel: int, hist: Tensor | None) -> None:
        self.bwd.layers.append(layer)
        if hist is not None:
            self._pending_grad_hist.append(hist)
        self._grad_layers_this_step.add(layer)  # grad_steps counts it when the step is folded

    def backward_addresses(
        self, layer: int, with_hist: bool
    ) -> tuple[int, ...] | triton_backend.BackwardRows:
        """Where the fused CPU kernels add one output gradient of ``layer``
        (``stats.accumulate_gradient``): its rows of grad_sum, grad_max and grad_hist (0 when
        ``with_hist`` is off). Only without loss scaling: a GradScaler's skipped steps must be
        dropped, so those gradients go through the slot rows. Commit with
        :meth:`commit_backward_direct`. With the device backend: views of those rows."""
        self._dirty = True
        key = (-1 - layer, with_hist)  # negative: apart from the forward rows' keys
        addresses = self._addresses.get(key)
        if addresses is None and self.device_rows:
            addresses = self._addresses[key] = triton_backend.BackwardRows(
                self.grad_sum[layer],
                self.grad_max[layer],
                self.grad_hist[layer] if with_hist else None,
            )
        elif addresses is None:
            addresses = self._addresses[key] = (
                _address(self.grad_sum, layer),
                _address(self.grad_max, layer),
                _address(self.grad_hist, layer) if with_hist else 0,
            )
        return addresses

    def commit_backward_direct(self, layer: int) -> None:
        self._grad_layers_this_step.add(layer)

    def record_params(
        self,
        index: Tensor,
        grad_norms: Tensor | None,
        weight_norms: Tensor | None,
        update_norms: Tensor | None,
        positions: list[int],
    ) -> None:
        """Add one sampled step's per-parameter norms (already on the device) to the window.

        ``positions`` lists each parameter once. On a CPU with the fused kernels the squares go
        in with one C call per column: a few cold torch ops per step cost more than the sums.
        """
        self._dirty = True
        counters = (self.host.param_steps, None, self.host.update_steps)
        for column, norms in enumerate((grad_norms, weight_norms, update_norms)):
            if norms is None:
                continue
            counter = counters[column]
            if (
                stats.c_fusable(norms)
                and norms.dtype is torch.float32
                and stats.c_fusable(self.param_sq)
            ):
                assert stats.FUSED is not None
                stats.FUSED.add_squares(
                    norms.data_ptr(),
                    positions,
                    self.param_sq.data_ptr(),
                    self.param_sq.stride(0),
                    column,
                    0 if counter is None else counter.__array_interface__["data"][0],
                )
                continue
            self.param_sq[:, column].index_add_(0, index, norms.double().square_())
            if counter is not None:
                counter[positions] += 1

    def record_sentinel(self, loss: Tensor | None, grad_norm_total: Tensor | None) -> None:
        """Every step: keep the loss and total gradient norm (device scalars, no host read).

        They are stacked once per window at the flush, so a step costs no device op here.
        """
        self._step_values.append(
            (
                None if loss is None else loss.detach(),
                None if grad_norm_total is None else grad_norm_total.detach(),
            )
        )
        self.host.loss_given.append(loss is not None)
        self.host.grad_given.append(grad_norm_total is not None)

    def _sentinel(self, missing: Tensor | None = None) -> Tensor:
        """(steps, 2) float32: loss and total gradient norm per step, NaN (or ``missing``)
        where not given."""
        fill = self._nan if missing is None else missing
        values = [
            fill if v is None else v.reshape(()).to(self.device, torch.float32)
            for pair in self._step_values
            for v in pair
        ]
        if not values:
            return torch.zeros(0, 2, dtype=torch.float32, device=self.device)
        return torch.stack(values).view(-1, 2)

    # ---- per step ------------------------------------------------------------------------
    def end_step(
        self,
        step: int,
        sampled: bool,
        amp_skipped: bool | None = None,
        grad_scale: Tensor | None = None,
    ) -> None:
        """Fold the step's slot rows into the window buffers (a constant number of calls).

        With a GradScaler, ``amp_skipped`` says the scaler skipped this step (its gradients
        overflowed and it lowered the scale): the step's output-gradient rows are dropped, not
        counted as NaN/Inf, and the step is counted as skipped. ``grad_scale`` (a device scalar)
        is the scale the step's backward ran with: output-gradient statistics are unscaled.
        """
        if self.first_step is None:
            self.first_step = step
        if sampled:
            self.sampled_steps.append(step)
        if amp_skipped is not None:
            self.host.amp_skipped.append(amp_skipped)
        if self.device is None:
            return
        self._fold_forward(step)
        if amp_skipped:
            self.bwd.layers.clear()
            self._pending_grad_hist.clear()
        else:
            for layer in self._grad_layers_this_step:
                self.host.grad_steps[layer] += 1
            self._fold_backward(grad_scale)
        self._layers_this_step.clear()
        self._grad_layers_this_step.clear()

    def _index(self, layers: list[int]) -> Tensor:
        key = tuple(layers)
        cached = self._index_cache.get(key)
        if cached is None:  # steady-state steps repeat the same call sequence: no host->device copy
            if len(self._index_cache) > 256:
                self._index_cache.clear()
            cached = torch.tensor(key, dtype=torch.int64, device=self.device)
            self._index_cache[key] = cached
        return cached

    def _fold_forward(self, step: int) -> None:
        calls = self._calls
        if not calls:
            return
        self._dirty = True
        layers = self.fwd.layers  # the calls in slot rows; direct calls are already in place
        per_slot = None
        if layers:
            index = self._index(layers)
            self.act_sum.index_add_(0, index, self.fwd.used("sums").double())
            maxes = self.fwd.used("maxes")
            maxes[:, 1].neg_()
            self.act_max.scatter_reduce_(0, index.unsqueeze(1).expand_as(maxes), maxes, "amax")
            self.act_count.index_add_(0, index, self.fwd.used("counts").long())
            hists = torch.stack(self._pending_hist)
            self.act_hist.index_add_(0, index, hists)
            per_slot = hists.index_select(1, self.nonfinite_bins).sum(1)
        if per_slot is not None and len(layers) == len(calls):
            per_call = per_slot
        elif self._call_counts is not None:  # the device backend's calls counted by position
            counts = self._call_counts[: len(calls)]
            per_call = counts.clone()
            counts.zero_()
            if per_slot is not None:
                places = [i for i, (_, count) in enumerate(calls) if count is None]
                per_call.index_copy_(0, self._index(places), per_slot)
        else:
            per_call = torch.tensor(
                [count or 0 for _, count in calls], dtype=torch.int64, device=self.device
            )
            if per_slot is not None:  # mixed: slot calls' counts at their places in the order
                places = [i for i, (_, count) in enumerate(calls) if count is None]
                per_call.index_copy_(0, self._index(places), per_slot)
        self._call_nonfinite.append((step, [layer for layer, _ in calls], per_call))
        if self._pending_lin:
            lin_layers = [layer for layer, _ in self._pending_lin]
            self.lin_hist.index_add_(
                0, self._index(lin_layers), torch.stack([h for _, h in self._pending_lin])
            )
        if self._pending_units or self._units_written:
            self._fold_units()
        layers.clear()
        calls.clear()
        self._pending_hist.clear()
        self._pending_lin.clear()
        self._pending_units.clear()
        self._units_written = False

    def _fold_units(self) -> None:
        """The step's per-unit maxima (direct calls wrote theirs already) into the window's,
        and the per-batch dead count; the step's maxima go back to -inf."""
        step_max = self.step_unit_max
        if self._pending_units:
            unit_layers = tuple(layer for layer, _ in self._pending_units)
            index = self._unit_index_cache.get(unit_layers)
            if index is None:
                positions = [
                    torch.arange(off, off + n)
                    for off, n in (self.unit_offsets[layer] for layer in unit_layers)
                ]
                index = torch.cat(positions).to(self.device)
                self._unit_index_cache[unit_layers] = index
            units = torch.cat([u for _, u in self._pending_units])
            step_max.scatter_reduce_(0, index, units, "amax")
        if stats.FUSED is not None and stats.c_fusable(step_max):  # one C call, no torch ops
            stats.FUSED.fold_units(
                step_max.data_ptr(),
                self.unit_max.data_ptr(),
                self.unit_layer.data_ptr(),
                self.batch_dead.data_ptr(),
                self.n_units,
            )
            return
        torch.maximum(self.unit_max, step_max, out=self.unit_max)
        # Units of layers that ran this step and were never > 0 in it: the per-batch dead count.
        dead_now = (step_max <= 0).logical_and_(step_max != _NEG_INF)
        self.batch_dead.index_add_(0, self.unit_layer, dead_now.double())
        step_max.fill_(_NEG_INF)

    def _fold_backward(self, grad_scale: Tensor | None = None) -> None:
        layers = self.bwd.layers
        if not layers:
            return
        self._dirty = True
        index = self._index(layers)
        sums = self.bwd.used("sums").double()
        maxes = self.bwd.used("maxes")
        maxes[:, 1].neg_()
        if grad_scale is not None:  # loss scaling: back to the gradients' true values
            inverse = grad_scale.reciprocal()
            sums[:, 0].mul_(inverse.double().square())
            maxes.mul_(inverse)
        self.grad_sum.index_add_(0, index, sums)
        self.grad_max.scatter_reduce_(0, index.unsqueeze(1).expand_as(maxes), maxes, "amax")
        if self._pending_grad_hist:  # gradient histograms on: one per call
            hists = torch.stack(self._pending_grad_hist)
            if grad_scale is not None:
                hists = stats.unscale_hist(hists, grad_scale)
            self.grad_hist.index_add_(0, index, hists)
        layers.clear()
        self._pending_grad_hist.clear()

    # ---- per window ----------------------------------------------------------------------
    def window_parts(self, missing: float | None = None) -> dict[str, Tensor]:
        """The window's device buffers by WindowData field name, in :data:`RANK_REDUCTION`'s
        order; the sentinel holds ``missing`` (default NaN) where a step reported no value."""
        fill = None
        if missing is not None:
            fill = torch.full((), missing, dtype=torch.float32, device=self.device)
        return {
            "act_sum": self.act_sum,
            "act_max": self.act_max,
            "act_count": self.act_count,
            "act_hist": self.act_hist,
            "lin_hist": self.lin_hist,
            "unit_max": self.unit_max,
            "batch_dead": self.batch_dead,
            "grad_sum": self.grad_sum,
            "grad_max": self.grad_max,
            "grad_hist": self.grad_hist,
            "param_sq": self.param_sq,
            "sentinel": self._sentinel(fill),
        }

    def nonfinite_order(self, first_step: int, steps: int, none: float) -> Tensor:
        """(steps, layers) float64: per step of the window and layer, the position in that
        step's call order of the layer's first call with a non-finite output (``none`` if
        none). A fixed-shape form of the per-call counts, for the cross-rank reduction."""
        order = torch.full((steps, self.n_layers), none, dtype=torch.float64, device=self.device)
        for step, layers, per_call in self._call_nonfinite:
            row = step - first_step
            if 0 <= row < steps:
                position = torch.arange(len(layers), dtype=torch.float64, device=self.device)
                first = torch.where(per_call > 0, position, none)
                order[row].scatter_reduce_(0, self._index(layers), first, "amin")
        return order

    def flush(self, last_step: int, steps_in_window: int) -> WindowData:
        """Pack the window into one vector, copy it to the host once, reset, and return it.

        With a :attr:`reducer` (torch.distributed, "reduce" mode) the window is first reduced
        over the ranks with a constant number of collectives; every rank gets the same result.
        """
        host_counts = self.host
        if self.reducer is not None:
            if self.device is None:  # every rank must take part in the collectives
                self.ensure_device(self.reducer.device)
            reduced, host_counts, call_nonfinite = self.reducer.reduce(
                self, last_step, steps_in_window
            )
            arrays = [reduced[name] for name in RANK_REDUCTION]
        elif self.device is not None:
            arrays = self._copy_to_host(steps_in_window)
        else:
            arrays = self._empty_arrays(steps_in_window)
        if self.reducer is None:
            call_nonfinite = [
                (step, layers, arrays[12 + i])
                for i, (step, layers, _) in enumerate(self._call_nonfinite)
            ]
        data = WindowData(
            first_step=self.first_step if self.first_step is not None else last_step,
            last_step=last_step,
            sampled_steps=list(self.sampled_steps),
            act_sum=arrays[0],
            act_max=arrays[1],
            act_count=arrays[2],
            act_hist=arrays[3],
            lin_hist=arrays[4],
            unit_max=arrays[5],
            batch_dead=arrays[6],
            grad_sum=arrays[7],
            grad_max=arrays[8],
            grad_hist=arrays[9],
            param_sq=arrays[10],
            sentinel=arrays[11],
            call_nonfinite=call_nonfinite,
            host=host_counts,
        )
        self._reset()
        return data

    def _copy_to_host(self, steps: int) -> list[np.ndarray]:
        """The window's buffers on the host in one device-to-host copy.

        Buffers nothing wrote to this window (a window of unsampled steps has only its
        sentinel; output-gradient histograms when they are off) are not copied: the host
        fills in their reset values. int64 counts travel as their bits viewed as float64
        (no conversion) and are viewed back as int64 on the host.
        """
        empty = self._empty_arrays(steps)
        names = list(RANK_REDUCTION)
        wanted = [
            (i, t)
            for i, (name, t) in enumerate(self.window_parts().items())
            if name == "sentinel" or (self._dirty and name not in self.skip_parts)
        ]
        parts = [t for _, t in wanted] + [t for _, _, t in self._call_nonfinite]
        packed = torch.cat(
            [
                p.reshape(-1).view(torch.float64)
                if p.dtype == torch.int64
                else p.reshape(-1).to(torch.float64)
                for p in parts
            ]
        )
        host = packed.cpu().numpy()  # the one device-to-host copy of the window
        copied = _split(host, parts)
        arrays = empty[: len(names)]
        for (i, _), array in zip(wanted, copied, strict=False):
            arrays[i] = array
        return arrays + copied[len(wanted) :]

    def _empty_arrays(self, steps: int) -> list[np.ndarray]:
        L, P = self.n_layers, self.n_params
        nan = np.full((steps, 2), np.nan)
        return [
            np.zeros((L, 4)),
            np.full((L, 2), -np.inf),
            np.zeros((L, 2)),
            np.zeros((L, stats.SYMLOG_BINS)),
            np.zeros((L, self.linear_bins + 1)),
            np.full(self.n_units, -np.inf),
            np.zeros(L),
            np.zeros((L, len(stats.GRAD_SUM_FIELDS))),
            np.full((L, 2), -np.inf),
            np.zeros((L, stats.SYMLOG_BINS)),
            np.zeros((P, 3)),
            nan,
        ]

    def _reset(self) -> None:
        if self.device is not None and self._dirty:
            for t in (
                self.act_sum,
                self.act_count,
                self.act_hist,
                self.lin_hist,
                self.batch_dead,
                self.grad_sum,
                self.grad_hist,
                self.param_sq,
            ):
                t.zero_()
            for t in (self.act_max, self.unit_max, self.grad_max):
                t.fill_(_NEG_INF)
        self._call_nonfinite = []
        self._step_values = []
        self.host = HostCounts.zeros(self.n_layers, self.n_params)
        self.sampled_steps = []
        self.first_step = None
        self._dirty = False


def _address(buffer: Tensor, row: int) -> int:
    """The address of ``buffer[row]`` (a contiguous buffer on the CPU) for the fused kernels."""
    return buffer.data_ptr() + row * buffer.stride(0) * buffer.element_size()


def _split(flat: np.ndarray, parts: list[Tensor]) -> list[np.ndarray]:
    """The packed float64 vector cut back into the parts' shapes (int64 parts: their bits)."""
    out, offset = [], 0
    for p in parts:
        n = p.numel()
        chunk = flat[offset : offset + n]
        if p.dtype == torch.int64:
            chunk = chunk.view(np.int64)
        out.append(chunk.reshape(tuple(p.shape)))
        offset += n
    return out
