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
from actmon.distributed import has_dtensor, local_tensors
from actmon.errors import ArgumentError, ConfigError, HookError, MonitorStateError
from actmon.functional import FunctionalCapture
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
    functional: bool = False  # an activation function called in ``module``'s forward
    owed_recompute: int = 0  # no-grad calls this step that a reentrant checkpoint will redo
    grad_hook: Callable[[Tensor], None] | None = None  # made once, registered on each output

    def public(self) -> LayerInfo:
        units = self.units
        if units is None and not self.functional:  # known from the module before it runs
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


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule; DDP/DataParallel


def _is_wrapper(module: nn.Module) -> bool:
    """A module that only wraps the user's model (its name prefix is not part of layer names)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    optimized = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    wrappers: tuple[type, ...] = (DataParallel, DistributedDataParallel)
    if isinstance(optimized, type):
        wrappers = (*wrappers, optimized)
    return isinstance(module, wrappers)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without wrapper modules and the prefixes they add.

    ``watch(torch.compile(model))`` and ``watch(DDP(model))`` name layers as ``watch(model)``
    does: ``0``, not ``_orig_mod.0`` or ``module.0``.
    """
    return [
        (strip_wrapper_prefix(name, model), module)
        for name, module in model.named_modules()
        if not _is_wrapper(module)
    ]


def strip_wrapper_prefix(name: str, model: nn.Module) -> str:
    """A parameter or module name of ``model`` with its wrappers' prefixes taken out (the
    wrapped model itself is the root, "")."""
    module = model
    while _is_wrapper(module):
        for prefix in _WRAPPER_PREFIXES:
            attribute = prefix[:-1]
            child = getattr(module, attribute, None)
            if isinstance(child, nn.Module) and (name == attribute or name.startswith(prefix)):
                name, module = name[len(prefix) :], child
                break
        else:
            break
    return name


def select_layers(model: nn.Module, config: Config) -> list[Layer]:
    """Every leaf module matching include/exclude, classified, with config overrides applied.

    Raises MonitorStateError for a model whose lazy modules have not made their weights yet
    (no hook can be put on an uninitialised parameter), and ArgumentError for TorchScript
    modules (torch refuses hooks on them), before anything is started.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            what = "model" if not name else f"module {name!r} of the model"
            raise ArgumentError(
                f"watch(model=...): the {what} is a TorchScript module"
                f" ({type(module).__name__}), and torch allows no hooks on those; watch the"
                " eager model (before torch.jit.script / trace), or use torch.compile"
            )
    for name, param in model.named_parameters():
        if isinstance(param, nn.parameter.UninitializedParameter):
            owner = name.rpartition(".")[0]
            kind = type(model.get_submodule(owner)).__name__
            raise MonitorStateError(
                f"watch(): parameter {strip_wrapper_prefix(name, model)!r} ({kind}) is not"
                " initialised yet; run one forward pass (model(example_batch)) before watch(),"
                " so that lazy modules create their weights"
            )
    layers: list[Layer] = []
    for name, module in named_modules(model):
        if any(True for _ in module.children()):
            continue
        layer = make_layer(len(layers), name or ROOT_NAME, module, classify(module), config)
        if layer is not None:
            layers.append(layer)
    return layers


def make_layer(
    index: int,
    name: str,
    module: nn.Module,
    info: KindInfo,
    config: Config,
    functional: bool = False,
) -> Layer | None:
    """One monitored layer with the config's overrides applied; None if include/exclude drop it."""
    if not _matches(name, config.include) or _matches(name, config.exclude):
        return None
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
    params: tuple[str, ...] = ()
    if not functional:
        params = tuple(
            f"{name}.{p}" if name != ROOT_NAME else p
            for p, t in module.named_parameters(recurse=False)
            if t.requires_grad
        )
    return Layer(index, name, module, info, axis_spec, params, functional=functional)


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


def _dense(grads: list[Tensor]) -> list[Tensor]:
    """Gradients whose norms the kernels take: a sparse one (``nn.Embedding(sparse=True)``)
    by the values it holds, since a coalesced sparse tensor's L2 norm is that of its values
    (coalescing sums the rows of repeated indices, as the dense gradient would)."""
    if all(g.layout is torch.strided for g in grads):  # the common case: one cheap pass
        return grads
    return [
        g
        if g.layout is torch.strided
        else g.coalesce().values()
        if g.layout is torch.sparse_coo
        else g.values()  # compressed layouts (CSR, ...) hold no repeated index
        for g in grads
    ]


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
        self.scaler: Any = None  # a torch.amp.GradScaler, set by the monitor
        self.grad_scale: Tensor | None = None  # the scale of this step's backward (device)
        self.stepped = False  # whether an optimizer stepped since the last monitor step
        # Parameters: every trainable one, by its named_parameters() name, with its owning layer.
        owner = {p: layer.index for layer in layers for p in layer.params}
        named = [
            (strip_wrapper_prefix(n, model), p)
            for n, p in model.named_parameters()
            if p.requires_grad
        ]
        self.param_names = [n for n, _ in named]
        self.param_layers: list[int | None] = [owner.get(n) for n, _ in named]
        self._param_position = {id(p): i for i, (_, p) in enumerate(named)}
        self._params = [p for _, p in named]
        if any(p.is_meta for p in self._params):  # e.g. a model built under device="meta"
            log.warning(
                "actmon: the model's parameters are on the meta device: its layers are watched"
                " once it runs, but parameter-gradient norms and update ratios are not, as"
                " to_empty() or load_state_dict(assign=True) make new parameters; call watch()"
                " after the model has its real parameters"
            )
        self._step_grad_norms: list[Tensor] = []  # per optimizer: stacked per-parameter norms
        self._pending_update: tuple[list[Tensor], list[Tensor], Tensor, list[int]] | None = None
        self._pending_no_opt: tuple[list[int], Tensor] | None = None
        self._callback_queued = False
        # Under torch.distributed (see share_norms): DTensor shards are measured locally, each
        # step's total norm is this rank's weighted share, and the end-of-backward callback
        # runs after DDP's gradient all-reduce.
        self._dtensors = has_dtensor(self._params)
        self._grad_share: Tensor | None = None  # per parameter: sqrt(1 / replicas)
        self._defer_backward = False
        self._deferred = False
        self._param_index_cache: dict[tuple[int, ...], Tensor] = {}
        self._optimizer_cache: dict[tuple[int, int, int], list[tuple[int, Tensor]]] = {}
        # Display order: a functional layer goes right after the layer that ran before it.
        self.order: list[int] = [layer.index for layer in layers]
        self.on_new_layer: Callable[[], None] = lambda: None  # the monitor refreshes its rules
        self._last_run: int | None = None
        self._sites: dict[str, Layer | None] = {}  # functional site -> layer (None: excluded)
        self._owed: set[int] = set()  # layers with reentrant-checkpoint recomputes owed
        self._not_float_logged: set[int] = set()  # layers whose non-float output was logged
        self.functional: FunctionalCapture | None = None
        try:
            self._register(model)
        except BaseException:  # e.g. an optimizer without step hooks: take out what went in
            self.remove()
            raise

    def _register(self, model: nn.Module) -> None:
        """Put every hook on the model and the optimizers (each handle kept for remove())."""
        layers = self.layers
        for layer in layers:
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))
        if self.config.functional:
            modules = [(n or ROOT_NAME, m) for n, m in named_modules(model)]
            leaves = {layer.module for layer in layers if not layer.functional}
            self.functional = FunctionalCapture(
                modules,
                leaves,
                self._functional_output,
                lambda: self.sampling,
                max_calls=self.config.functional_max_calls,
            )
            self.functional.arm(self.sampling)
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
            # Under torch.compile this check is traced (dynamo compiles a sampled and an
            # unsampled variant); the recording is never traced: a graph break on sampled
            # steps only. (dynamo.disable costs ~0.4 us a call in eager, sampled steps only.)
            if not self.sampling or layer.disabled:
                return
            self._record_eager(layer, output, args)

        return forward_hook

    def _record(self, layer: Layer, output: Any, args: Any) -> None:
        """Summarise one output of a layer (a module's, or a functional activation's)."""
        if torch._C._current_graph_task_id() != -1:  # a checkpoint recomputing in backward
            if not layer.owed_recompute:
                return  # non-reentrant: this forward was recorded the first time
            layer.owed_recompute -= 1  # reentrant: the first forward ran under no_grad
        elif self.config.skip_no_grad and not torch.is_grad_enabled():
            layer.owed_recompute += 1
            self._owed.add(layer.index)
            return
        start = time.perf_counter()
        try:
            tensor = first_tensor(output)
            if tensor is not None and not self._add_in_place(layer, tensor):
                with torch.no_grad():
                    self._summarize_forward(layer, tensor, args)
        except Exception as exc:  # contained: never break the user's forward
            self._fail(layer, exc)
        finally:
            self.overhead_seconds += time.perf_counter() - start

    _record_eager = torch.compiler.disable(_record)

    def set_sampling(self, sampling: bool) -> None:
        """Whether the coming step takes full statistics (the monitor decides)."""
        self.sampling = sampling
        if self.functional is not None:
            self.functional.arm(sampling)

    # ---- functional activations ----------------------------------------------------------
    def _functional_output(
        self, site: str, module: nn.Module, make_info: Callable[[], KindInfo], output: Any
    ) -> None:
        if not self.sampling:
            return
        if site in self._sites:
            layer = self._sites[site]
        else:
            layer = self._add_functional_layer(site, module, make_info)
        if layer is not None and not layer.disabled:
            self._record(layer, output, ())

    def _add_functional_layer(
        self, site: str, module: nn.Module, make_info: Callable[[], KindInfo]
    ) -> Layer | None:
        try:
            layer = make_layer(
                len(self.layers), site, module, make_info(), self.config, functional=True
            )
        except ConfigError as exc:  # a kind override that cannot apply: skip, say why once
            self.on_error(site, exc)
            layer = None
        self._sites[site] = layer
        if layer is None:
            return None
        self.layers.append(layer)
        self.aggregator.add_layer()
        after = self.order.index(self._last_run) + 1 if self._last_run is not None else 0
        self.order.insert(after, layer.index)
        self.on_new_layer()
        return layer

    def _add_in_place(self, layer: Layer, output: Tensor) -> bool:
        """The common CPU case in few steps: a float32 output the fused kernels take, of a layer
        whose spec is known, added straight into its window rows. Reads only the output's
        memory (no autograd op, so no no_grad block but around the linear histogram). False:
        take the general path."""
        if (
            output.dtype is not torch.float32
            or output.layout is not torch.strided
            or not self.aggregator.on_cpu
        ):
            return False
        spec = layer.specs.get(output.dim())
        if spec is None or spec.softmax_dim is not None or not stats.fusable(output):
            return False
        numel = output.numel()
        if not 0 < numel <= stats.INT32_LIMIT:
            return False
        if spec.unit_axis is not None and output.shape[spec.unit_axis] != layer.units:
            return False  # the general path says what is wrong
        self._add_direct(layer, output, spec)
        self._after_forward(layer, output)
        return True

    def _add_direct(self, layer: Layer, x: Tensor, spec: stats.ActivationSpec) -> None:
        """Add a fusable float32 CPU output's statistics straight into the layer's window rows
        (the fused kernels; nothing is left to fold)."""
        agg = self.aggregator
        units = spec.unit_axis is not None
        nonfinite = stats.accumulate_activation(x, spec, agg.forward_addresses(layer.index, units))
        linear = None
        if spec.linear_bins:  # torch ops on the output: no autograd
            with torch.no_grad():
                linear = stats.linear_hist(x, spec, self._scratch)
        agg.commit_direct(layer.index, x.numel(), nonfinite, linear, 0)

    def _after_forward(self, layer: Layer, output: Tensor) -> None:
        """After a call is recorded: the run order, and the output-gradient hook."""
        self._last_run = layer.index
        if self._unresolved and layer.unit_axis is not None:  # consumers inherit this unit axis
            self._producer_axis[(output.data_ptr(), tuple(output.shape))] = layer.unit_axis
        if self.config.gradients.output and output.requires_grad:
            hook = layer.grad_hook
            if hook is None:
                hook = layer.grad_hook = self._make_grad_hook(layer)
            output.register_hook(hook)

    def _summarize_forward(self, layer: Layer, output: Tensor, args: Any) -> None:
        if not output.is_floating_point():  # token ids, masks, indices: nothing to summarise
            self._not_float(layer, output)
            return
        x = stats.as_float32(output, f"layer {layer.name!r} output")
        if x is None:  # an empty batch: the layer ran and is listed, with nothing counted
            self.aggregator.commit_empty(layer.index)
            self._last_run = layer.index
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
        agg = self.aggregator
        if spec.softmax_dim is None and stats.fusable(x):  # e.g. a converted bf16 output
            self._add_direct(layer, x, spec)
        else:
            sums, maxes, counts = agg.forward_rows()
            hist, unit_max, linear = stats.summarize_activation(
                x, spec, sums, maxes, counts, self._scratch
            )
            rows = x.numel() // x.shape[spec.softmax_dim] if spec.softmax_dim is not None else 0
            agg.commit_forward(layer.index, x.numel(), hist, unit_max, linear, rows)
        self._after_forward(layer, output)

    def _not_float(self, layer: Layer, output: Tensor) -> None:
        """Leave a non-float output (int, bool, complex) out of the statistics; say so once
        per layer (an output's dtype is known only once the layer has run)."""
        if layer.index not in self._not_float_logged:
            self._not_float_logged.add(layer.index)
            log.info(
                "actmon: layer %r outputs %s, not floating point; it is left out of the statistics",
                layer.name,
                output.dtype,
            )

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
                if not self._add_grad_in_place(layer, grad):
                    with torch.no_grad():
                        self._summarize_gradient(layer, grad)
            except Exception as exc:  # contained: never break the user's backward
                self._fail(layer, exc)
            finally:
                self.overhead_seconds += time.perf_counter() - start

        return grad_hook

    def _add_grad_in_place(self, layer: Layer, grad: Tensor) -> bool:
        """The common CPU case (see :meth:`_add_in_place`): without loss scaling, a float32
        gradient the fused kernels take goes straight into the layer's window rows."""
        if (
            self.scaler is not None
            or grad.dtype is not torch.float32
            or grad.layout is not torch.strided
            or not self.aggregator.on_cpu
            or not stats.fusable(grad)
            or not 0 < grad.numel() <= stats.INT32_LIMIT
        ):
            return False
        self._add_grad_direct(layer, grad)
        return True

    def _add_grad_direct(self, layer: Layer, g: Tensor) -> None:
        """Add a fusable float32 CPU gradient straight into the layer's window rows (only
        without loss scaling: skipped steps' rows must be droppable)."""
        agg = self.aggregator
        stats.accumulate_gradient(g, agg.backward_addresses(layer.index, self._grad_hist))
        agg.commit_backward_direct(layer.index)

    def _summarize_gradient(self, layer: Layer, grad: Tensor) -> None:
        g = stats.as_float32(grad, f"layer {layer.name!r} output gradient")
        if g is None or g.device != self.aggregator.device:
            return
        if self.scaler is not None and self.grad_scale is None:
            scale = getattr(self.scaler, "_scale", None)  # what this backward was scaled by
            if scale is not None and self.scaler.is_enabled():
                self.grad_scale = scale.detach().clone()  # update() changes it in place later
        agg = self.aggregator
        if self.scaler is None and stats.fusable(g):  # a converted gradient (bf16, fp16)
            self._add_grad_direct(layer, g)
            return
        sums, maxes = agg.backward_rows()
        hist = stats.summarize_gradient(g, sums, maxes, self._grad_hist, self._grad_scratch)
        agg.commit_backward(layer.index, g.numel(), hist)

    # ---- parameter gradients -------------------------------------------------------------
    def _optimizer_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.stepped = True  # a GradScaler that skips the step never calls optimizer.step()
        start = time.perf_counter()
        try:
            watched = self._optimizer_params(optimizer)
            with_grad = [(pos, p.grad) for pos, p in watched if p.grad is not None]
            if with_grad:
                positions = [pos for pos, _ in with_grad]
                grads = [g for _, g in with_grad]
                if self._dtensors:  # a shard's own norm; the ranks' squares add at the flush
                    grads = local_tensors(grads)
                norms = stats.norms(_dense(grads))
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
            updates = stats.norms(before)
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
        if self._defer_backward and not self._deferred:
            # DDP queues the callback that finishes its gradient all-reduce after ours (when
            # its last bucket is ready); queued again, ours runs after it and sees the
            # averaged gradients, not this rank's local ones.
            self._deferred = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            return
        self._deferred = False
        self._callback_queued = False
        start = time.perf_counter()
        try:
            positions = [i for i, p in enumerate(self._params) if p.grad is not None]
            if positions:
                grads = [self._params[i].grad for i in positions]
                if self._dtensors:
                    grads = local_tensors(grads)  # type: ignore[arg-type,assignment]
                norms = stats.norms(_dense(grads))  # type: ignore[arg-type]
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
        self.aggregator.ensure_device(norms.device)
        share = self._grad_share
        if share is None:
            self._step_grad_norms.append(norms)
        else:  # distributed: sqrt(sum w * norm^2) is this rank's share of the global norm
            if share.device != norms.device:
                share = self._grad_share = share.to(norms.device)
            self._step_grad_norms.append(norms * share[self._param_index(positions)])
        if not (self.sampling and self.config.gradients.parameters):
            return
        index = self._param_index(positions)
        params: list[Tensor] = [self._params[i] for i in positions]  # norms read their memory
        if self._dtensors:
            params = local_tensors([p.detach() for p in params])
        with torch.no_grad():
            weights = stats.norms(params)
        self.aggregator.record_params(index, norms, weights, None, positions)
        if measure_update and self.measure_update and self.config.gradients.update_ratio:
            detached = [p.detach() for p in params]
            try:
                before = list(torch._foreach_mul(detached, 1.0))  # transient copy, this step only
            except torch.OutOfMemoryError:
                self.config.gradients.update_ratio = False
                log.warning("actmon: not enough memory to measure update ratios; turned off")
                return
            self._pending_update = (before, detached, index, positions)

    def share_norms(self, weights: Tensor) -> None:
        """Under torch.distributed: weigh each parameter's squared norm by ``weights`` (1 /
        replicas, see :func:`actmon.distributed.param_weights`) in the step's total gradient
        norm, and take norms without an optimizer after DDP's gradient all-reduce."""
        self._grad_share = weights.to(torch.float32).sqrt()
        self._defer_backward = True

    def end_step(self) -> Tensor | None:
        """The step's total parameter-gradient norm (a device scalar), or None if none was seen."""
        for index in self._owed:
            self.layers[index].owed_recompute = 0
        self._owed.clear()
        if self.functional is not None:
            self.functional.reset()
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
        if self.functional is not None:
            self.functional.arm(False)
        for p in self._restore_none:  # the model's hook slots exactly as they were
            if not p._post_accumulate_grad_hooks:
                p._post_accumulate_grad_hooks = None  # type: ignore[assignment]
        self._restore_none.clear()
