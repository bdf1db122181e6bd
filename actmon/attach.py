"""Attach: find every leaf layer, classify it, and register the hooks that feed the aggregator.

Hook signatures, spelled out (what torch calls and when):

* forward hook ``hook(module, args, output) -> None`` after each call of a monitored module;
  on sampled steps it summarises ``output`` at once (before any in-place op can overwrite it)
  and, when the output needs a gradient, registers ``output.register_hook(grad_hook)``.
* tensor hook ``grad_hook(grad) -> None`` when the gradient of that output is computed. Tensor
  hooks replace ``register_full_backward_hook``, which breaks on ``nn.ReLU(inplace=True)``.
* optimizer step pre-hook ``hook(optimizer, args, kwargs) -> None`` before each optimizer step:
  parameter-gradient norms after accumulation (and the every-step gradient-norm sentinel);
  step post-hook ``hook(optimizer, args, kwargs)`` measures the update for update-to-weight ratios.
* without an optimizer, ``param.register_post_accumulate_grad_hook(hook(param))`` queues one
  end-of-backward callback that takes the same norms.

Every hook contains its own failures: the layer is skipped, the error counted and logged once
(``strict=True`` raises :class:`~actmon.errors.HookError` instead).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from actmon import stats
from actmon.aggregate import Aggregator
from actmon.config import Config
from actmon.errors import ConfigError, HookError
from actmon.kinds import BOUNDED_KINDS, Kind, KindInfo, classify, with_kind
from actmon.snapshot import LayerInfo

log = logging.getLogger("actmon")

ROOT_NAME = "(root)"


@dataclass
class Layer:
    """Internal state of one monitored layer."""

    index: int
    name: str
    module: nn.Module
    info: KindInfo
    axis_spec: int | None  # signed unit axis: config override or the module's own; None: infer
    params: tuple[str, ...] = ()
    unit_axis: int | None = None  # resolved, signed as given (e.g. -1) once the layer has run
    units: int | None = None
    disabled: bool = False
    specs: dict[int, stats.ActivationSpec] = field(default_factory=dict)  # by output ndim

    def public(self) -> LayerInfo:
        units = self.units
        if units is None:  # known from the module before it runs
            units = (
                getattr(self.module, "out_features", None)
                or getattr(self.module, "out_channels", None)
                or getattr(self.module, "num_features", None)
            )
        return LayerInfo(
            self.name,
            self.info.kind,
            self.unit_axis if self.unit_axis is not None else self.axis_spec,
            units,
            self.params,
            self.info.bounds,
        )


def select_layers(model: nn.Module, config: Config) -> list[Layer]:
    """Every leaf module matching include/exclude, classified, with config overrides applied."""
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue
        name = name or ROOT_NAME
        if not _matches(name, config.include) or _matches(name, config.exclude):
            continue
        info = classify(module)
        kind = _first_match(name, config.kinds)
        if kind is not None:
            info = with_kind(info, Kind(kind))
            if info.kind is Kind.CLIPPING and info.bounds is None:
                raise ConfigError(
                    f"config field 'kinds': layer {name!r} ({type(module).__name__}) cannot be"
                    " 'clipping': its clip bounds are unknown; clipping applies to Hardtanh,"
                    " ReLU6 and Hardsigmoid"
                )
        axis = _first_match(name, config.unit_axis)
        axis_spec = int(axis) if axis is not None else info.unit_axis
        params = tuple(
            f"{name}.{p}" if name != ROOT_NAME else p
            for p, t in module.named_parameters(recurse=False)
            if t.requires_grad
        )
        layers.append(Layer(len(layers), name, module, info, axis_spec, params))
    return layers


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def _first_match(name: str, table: dict[str, Any]) -> Any:
    for glob, value in table.items():
        if fnmatch.fnmatchcase(name, glob):
            return value
    return None


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a layer's output stands for: itself, or the first tensor of a tuple/list/dict."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        items: Iterable[Any] = output
    elif isinstance(output, dict):
        items = output.values()
    else:
        return None
    for item in items:
        if isinstance(item, Tensor):
            return item
    return None


class Attacher:
    """Registers and owns every hook of one monitor; :meth:`remove` takes them all out again."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[Layer],
        aggregator: Aggregator,
        config: Config,
        optimizers: Sequence[torch.optim.Optimizer],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self.layers = layers
        self.aggregator = aggregator
        self.config = config
        self.on_error = on_error
        self.sampling = True  # set by the monitor before each step
        self.measure_update = True  # set by the monitor: the first sampled step of a window
        self._grad_hist = config.gradients.histogram
        self._scratch = stats.Scratch()  # forward hooks
        self._grad_scratch = stats.Scratch()  # tensor hooks (may run on autograd's own thread)
        self.overhead_seconds = 0.0
        self._handles: list[RemovableHandle] = []
        self._restore_none: list[nn.Parameter] = []
        self._producer_axis: dict[tuple[int, tuple[int, ...]], int] = {}
        self._unresolved = len(layers)
        self._optimizers = list(optimizers)
        # Parameters: every trainable one, by its named_parameters() name, with its owning layer.
        owner = {p: layer.index for layer in layers for p in layer.params}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.param_layers: list[int | None] = [owner.get(n) for n, _ in named]
        self._param_position = {id(p): i for i, (_, p) in enumerate(named)}
        self._params = [p for _, p in named]
        self._step_grad_norms: list[Tensor] = []  # per optimizer: stacked per-parameter norms
        self._pending_update: tuple[list[Tensor], list[Tensor], Tensor, list[int]] | None = None
        self._pending_no_opt: tuple[list[int], Tensor] | None = None
        self._callback_queued = False
        self._param_index_cache: dict[tuple[int, ...], Tensor] = {}
        self._optimizer_cache: dict[tuple[int, int, int], list[tuple[int, Tensor]]] = {}
        for layer in layers:
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))
        # Parameter hooks run every step: the gradient-norm sentinel needs them even when
        # per-parameter statistics are off.
        if self._optimizers:
            for opt in self._optimizers:
                self._handles.append(opt.register_step_pre_hook(self._optimizer_pre_hook))
                self._handles.append(opt.register_step_post_hook(self._optimizer_post_hook))
        else:
            for p in self._params:
                if p._post_accumulate_grad_hooks is None:
                    self._restore_none.append(p)
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulated))

    # ---- forward -------------------------------------------------------------------------
    def _make_forward_hook(self, layer: Layer) -> Callable[[nn.Module, Any, Any], None]:
        def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.sampling or layer.disabled:
                return
            if self.config.skip_no_grad and not torch.is_grad_enabled():
                return
            start = time.perf_counter()
            try:
                tensor = first_tensor(output)
                if tensor is not None:
                    with torch.no_grad():
                        self._summarize_forward(layer, tensor, args)
            except Exception as exc:  # contained: never break the user's forward
                self._fail(layer, exc)
            finally:
                self.overhead_seconds += time.perf_counter() - start

        return forward_hook

    def _summarize_forward(self, layer: Layer, output: Tensor, args: Any) -> None:
        x = stats.as_float32(output, f"layer {layer.name!r} output")
        if x is None:
            return
        spec = layer.specs.get(x.dim())
        if spec is None:
            spec = self._spec_for(layer, output, args)
        self.aggregator.ensure_device(x.device)
        if x.device != self.aggregator.device:
            raise HookError(
                f"layer {layer.name!r} output is on {x.device}, the monitor's buffers on"
                f" {self.aggregator.device}"
            )
        if spec.unit_axis is not None and x.shape[spec.unit_axis] != layer.units:
            raise HookError(
                f"layer {layer.name!r} output has {x.shape[spec.unit_axis]} units on axis"
                f" {spec.unit_axis}, earlier calls had {layer.units}"
            )
        sums, maxes, counts = self.aggregator.forward_rows()
        hist, unit_max, linear = stats.summarize_activation(
            x, spec, sums, maxes, counts, self._scratch
        )
        rows = x.numel() // x.shape[spec.softmax_dim] if spec.softmax_dim is not None else 0
        self.aggregator.commit_forward(layer.index, x.numel(), hist, unit_max, linear, rows)
        if self._unresolved and layer.unit_axis is not None:  # consumers inherit this unit axis
            self._producer_axis[(output.data_ptr(), tuple(output.shape))] = layer.unit_axis
        if self.config.gradients.output and output.requires_grad:
            output.register_hook(self._make_grad_hook(layer))

    def _spec_for(self, layer: Layer, output: Tensor, args: Any) -> stats.ActivationSpec:
        """Resolve the unit axis (override, module, producer, shape) and build the layer's spec."""
        ndim = output.dim()
        if layer.unit_axis is None:
            axis = layer.axis_spec
            if axis is None:
                producer = first_tensor(args)
                if producer is not None:
                    axis = self._producer_axis.get((producer.data_ptr(), tuple(producer.shape)))
            if axis is None:
                axis = 1 if ndim >= 4 else -1  # (N, C, H, W...) vs (N, ..., C)
            if ndim and not -ndim <= axis < ndim:
                raise HookError(
                    f"layer {layer.name!r}: unit axis {axis} is out of range for an output of"
                    f" shape {tuple(output.shape)}"
                )
            layer.unit_axis = axis
            layer.units = int(output.shape[axis]) if ndim else 1
            self._unresolved -= 1
            if not self._unresolved:
                self._producer_axis.clear()
        assert layer.unit_axis is not None
        unit_axis = layer.unit_axis % ndim if ndim else None
        tracks = layer.info.tracks_units and unit_axis is not None
        if tracks:
            assert layer.units is not None
            self.aggregator.register_units(layer.index, layer.units)
        softmax_dim = None
        if layer.info.kind is Kind.SOFTMAX and ndim:
            dim = layer.info.softmax_dim
            if dim is None:  # torch's legacy implicit softmax dim
                dim = 0 if ndim in (0, 1, 3) else 1
            softmax_dim = dim % ndim
        bounded = layer.info.kind in BOUNDED_KINDS and layer.info.bounds is not None
        spec = stats.ActivationSpec(
            info=layer.info,
            unit_axis=unit_axis if tracks else None,
            reduce_dims=tuple(d for d in range(ndim) if d != unit_axis) if tracks else (),
            saturation_eps=self.config.saturation_eps,
            linear_bins=self.config.histogram.linear_bins if bounded else 0,
            softmax_dim=softmax_dim,
        )
        layer.specs[ndim] = spec
        return spec

    # ---- output gradients ----------------------------------------------------------------
    def _make_grad_hook(self, layer: Layer) -> Callable[[Tensor], None]:
        def grad_hook(grad: Tensor) -> None:
            if layer.disabled:
                return
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    self._summarize_gradient(layer, grad)
            except Exception as exc:  # contained: never break the user's backward
                self._fail(layer, exc)
            finally:
                self.overhead_seconds += time.perf_counter() - start

        return grad_hook

    def _summarize_gradient(self, layer: Layer, grad: Tensor) -> None:
        g = stats.as_float32(grad, f"layer {layer.name!r} output gradient")
        if g is None or g.device != self.aggregator.device:
            return
        sums, maxes = self.aggregator.backward_rows()
        hist = stats.summarize_gradient(g, sums, maxes, self._grad_hist, self._grad_scratch)
        self.aggregator.commit_backward(layer.index, g.numel(), hist)

    # ---- parameter gradients -------------------------------------------------------------
    def _optimizer_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            watched = self._optimizer_params(optimizer)
            with_grad = [(pos, p.grad) for pos, p in watched if p.grad is not None]
            if with_grad:
                positions = [pos for pos, _ in with_grad]
                norms = torch.stack(torch._foreach_norm([g for _, g in with_grad]))
                self._take_param_norms(positions, norms, measure_update=True)
        except Exception as exc:
            self._fail(None, exc)
        finally:
            self.overhead_seconds += time.perf_counter() - start

    def _optimizer_params(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, Tensor]]:
        """(position, parameter) of the watched parameters an optimizer steps; cached until its
        param_groups change (add_param_group)."""
        groups = optimizer.param_groups
        key = (id(optimizer), len(groups), sum(len(g["params"]) for g in groups))
        cached = self._optimizer_cache.get(key)
        if cached is None:
            cached = [
                (pos, p)
                for group in groups
                for p in group["params"]
                if (pos := self._param_position.get(id(p))) is not None
            ]
            self._optimizer_cache[key] = cached
        return cached

    def _optimizer_post_hook(
        self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
    ) -> None:
        if self._pending_update is None:
            return
        start = time.perf_counter()
        try:
            before, params, index, positions = self._pending_update
            self._pending_update = None
            torch._foreach_sub_(before, params)
            updates = torch.stack(torch._foreach_norm(before))
            self.aggregator.record_params(index, None, None, updates, positions)
        except Exception as exc:
            self._fail(None, exc)
        finally:
            self.overhead_seconds += time.perf_counter() - start

    def _accumulated(self, _param: Tensor) -> None:
        """Post-accumulate-grad hook (no optimizer): queue one end-of-backward callback."""
        if self._callback_queued:
            return
        self._callback_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        start = time.perf_counter()
        try:
            positions = [i for i, p in enumerate(self._params) if p.grad is not None]
            if positions:
                grads = [self._params[i].grad for i in positions]
                norms = torch.stack(torch._foreach_norm(grads))  # type: ignore[arg-type]
                # Accumulation: a later backward of the same step sees the summed gradient and
                # replaces this; the step's last backward is what monitor.step() records.
                self._pending_no_opt = (positions, norms)
        except Exception as exc:
            self._fail(None, exc)
        finally:
            self.overhead_seconds += time.perf_counter() - start

    def _param_index(self, positions: list[int]) -> Tensor:
        key = tuple(positions)
        index = self._param_index_cache.get(key)
        if index is None:
            index = torch.tensor(key, dtype=torch.int64, device=self.aggregator.device)
            self._param_index_cache[key] = index
        return index

    def _take_param_norms(self, positions: list[int], norms: Tensor, measure_update: bool) -> None:
        """Record the step's gradient norms (every step: the sentinel) and, on sampled steps,
        per-parameter gradient and weight norms, and start measuring the update."""
        params = [self._params[i] for i in positions]
        self.aggregator.ensure_device(norms.device)
        self._step_grad_norms.append(norms)
        if not (self.sampling and self.config.gradients.parameters):
            return
        index = self._param_index(positions)
        detached = [p.detach() for p in params]
        weights = torch.stack(torch._foreach_norm(detached))
        self.aggregator.record_params(index, norms, weights, None, positions)
        if measure_update and self.measure_update and self.config.gradients.update_ratio:
            try:
                before = list(torch._foreach_mul(detached, 1.0))  # transient copy, this step only
            except torch.OutOfMemoryError:
                self.config.gradients.update_ratio = False
                log.warning("actmon: not enough memory to measure update ratios; turned off")
                return
            self._pending_update = (before, detached, index, positions)

    def end_step(self) -> Tensor | None:
        """The step's total parameter-gradient norm (a device scalar), or None if none was seen."""
        if self._pending_no_opt is not None:
            positions, norms = self._pending_no_opt
            self._pending_no_opt = None
            self._take_param_norms(positions, norms, measure_update=False)
        if not self._step_grad_norms:
            return None
        per_optimizer = self._step_grad_norms
        stacked = per_optimizer[0] if len(per_optimizer) == 1 else torch.cat(per_optimizer)
        per_optimizer.clear()
        return torch.linalg.vector_norm(stacked)

    # ---- errors and removal --------------------------------------------------------------
    def _fail(self, layer: Layer | None, exc: BaseException) -> None:
        if layer is not None:
            layer.disabled = True
        self.on_error(layer.name if layer is not None else "(parameters)", exc)

    def remove(self) -> None:
        """Take out every hook this attacher registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self._restore_none:  # the model's hook slots exactly as they were
            if not p._post_accumulate_grad_hooks:
                p._post_accumulate_grad_hooks = None  # type: ignore[assignment]
        self._restore_none.clear()
