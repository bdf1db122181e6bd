"""Functional activations: ``F.relu(x)`` inside a forward is monitored like an ``nn.ReLU`` module.

Module hooks see modules, not function calls, so a model written with ``F.gelu`` in its forward
would have no activation statistics. On sampled steps :class:`FunctionalCapture` tracks which
module is running (forward pre-hooks and always-called forward hooks on every module) and,
while a container module's own code runs, a ``TorchFunctionMode`` sees each torch call. An
activation function (:data:`ACTIVATIONS`) is attributed to the innermost running module as
``<module>.<fn>#<k>``, ``k`` counting that function's calls in that module's forward from 0, and
its output is handed to ``on_output`` (the attacher summarises it like a module output).

Bounded: a module that calls one function more than ``max_calls`` times in a forward (a
hand-written RNN calling ``torch.tanh`` per time step) gets one layer ``<module>.<fn>#<max>+``
for every call from ``max_calls`` on, so a varying sequence length cannot add layers without
end; a warning says so once per site.

Cost: nothing on unsampled steps (the hooks are registered only for sampled steps). On sampled
steps the mode is popped inside leaf modules, where calls are either not activations (Linear)
or already monitored as the module's own output (``nn.GELU`` calls ``F.gelu``); so only torch
calls written in container forwards pass through Python.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from actmon.kinds import Kind, KindInfo

log = logging.getLogger("actmon")

MAX_CALLS = 16  # the default of Config.functional_max_calls

InfoFor = Callable[[tuple[Any, ...], dict[str, Any]], KindInfo]


def _fixed(info: KindInfo) -> InfoFor:
    return lambda args, kwargs: info


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _softmax(log: bool) -> InfoFor:
    def info(args: tuple[Any, ...], kwargs: dict[str, Any]) -> KindInfo:
        dim = _arg(args, kwargs, 1, "dim", None)
        return KindInfo(
            Kind.SOFTMAX,
            bounds=None if log else (0.0, 1.0),
            softmax_dim=None if dim is None else int(dim),
            log_softmax=log,
        )

    return info


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> KindInfo:
    low = float(_arg(args, kwargs, 1, "min_val", -1.0))
    high = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return KindInfo(Kind.CLIPPING, bounds=(low, high))


def _table() -> dict[Callable[..., Any], tuple[str, InfoFor]]:
    """Every monitored activation callable -> (its short name in layer names, its kind)."""
    relu, leaky = _fixed(KindInfo(Kind.RELU)), _fixed(KindInfo(Kind.LEAKY))
    smooth = _fixed(KindInfo(Kind.SMOOTH_GATED))
    sigmoid = _fixed(KindInfo(Kind.SIGMOID, bounds=(0.0, 1.0)))
    tanh = _fixed(KindInfo(Kind.TANH, bounds=(-1.0, 1.0)))
    groups: list[tuple[str, InfoFor, tuple[Any, ...]]] = [
        ("relu", relu, (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)),
        ("relu6", _fixed(KindInfo(Kind.CLIPPING, bounds=(0.0, 6.0))), (F.relu6,)),
        ("hardtanh", _hardtanh, (F.hardtanh, F.hardtanh_)),
        ("hardsigmoid", _fixed(KindInfo(Kind.CLIPPING, bounds=(0.0, 1.0))), (F.hardsigmoid,)),
        ("leaky_relu", leaky, (F.leaky_relu, F.leaky_relu_)),
        ("elu", leaky, (F.elu, F.elu_)),
        ("selu", leaky, (F.selu, F.selu_, torch.selu)),
        ("celu", leaky, (F.celu, F.celu_)),
        ("prelu", leaky, (F.prelu,)),
        ("rrelu", leaky, (F.rrelu, F.rrelu_)),
        ("gelu", smooth, (F.gelu,)),
        ("silu", smooth, (F.silu,)),
        ("mish", smooth, (F.mish,)),
        ("hardswish", smooth, (F.hardswish,)),
        ("softplus", smooth, (F.softplus,)),
        ("sigmoid", sigmoid, (F.sigmoid, torch.sigmoid, Tensor.sigmoid, Tensor.sigmoid_)),
        ("tanh", tanh, (F.tanh, torch.tanh, Tensor.tanh, Tensor.tanh_)),
        ("softmax", _softmax(False), (F.softmax, torch.softmax, Tensor.softmax)),
        ("log_softmax", _softmax(True), (F.log_softmax, torch.log_softmax, Tensor.log_softmax)),
    ]
    return {fn: (name, info) for name, info, fns in groups for fn in fns}


ACTIVATIONS = _table()

# (the site's layer name, the calling module, its kind (made when first needed), the output)
OnOutput = Callable[[str, nn.Module, Callable[[], KindInfo], Any], None]


@dataclass
class _Frame:
    """One running module: its name, whether it is a leaf, and its calls per function so far."""

    name: str
    module: nn.Module
    leaf: bool
    calls: dict[str, int] = field(default_factory=dict)


class _Mode(TorchFunctionMode):
    """Sees every torch call made while a container module's own code runs."""

    def __init__(self, capture: FunctionalCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        entry = ACTIVATIONS.get(func)
        if entry is not None:
            self.capture.seen(entry, args, kwargs, out)
        return out


class FunctionalCapture:
    """Tracks the running module and switches the function mode; see the module docstring."""

    def __init__(
        self,
        modules: list[tuple[str, nn.Module]],
        leaves: set[nn.Module],
        on_output: OnOutput,
        sampling: Callable[[], bool],
        max_calls: int = MAX_CALLS,
    ) -> None:
        self._modules = modules
        self._max_calls = max_calls
        self._aggregated: set[str] = set()  # sites whose later calls share one layer (warned)
        self._leaves = leaves
        self._on_output = on_output
        self._sampling = sampling
        self._stack: list[_Frame] = []
        self._handles: list[RemovableHandle] = []
        self._mode = _Mode(self)
        self._mode_on = False

    def arm(self, on: bool) -> None:
        """Register the pre-hooks and always-called forward hooks on every module (``on``: the
        coming step is sampled), or take them out again: unsampled steps pay nothing.

        Under torch.compile the hooks return at once (they cannot follow a compiled graph), and
        dynamo keeps one compiled variant with them and one without.
        """
        if on == bool(self._handles):
            return
        if not on:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.reset()
            return
        for name, module in self._modules:
            leaf = module in self._leaves
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, leaf)))
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))

    def reset(self) -> None:
        """End of step: drop frames of forwards that never returned and leave the mode."""
        while self._stack:
            self._pop()

    def _pre_hook(self, name: str, leaf: bool) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling() or not self._sampling():
                return
            self._stack.append(_Frame(name, module, leaf))
            self._set_mode(not leaf)

        return pre_hook

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1].module is module:
            self._pop()

    def _pop(self) -> None:
        self._stack.pop()
        self._set_mode(bool(self._stack) and not self._stack[-1].leaf)

    def _set_mode(self, on: bool) -> None:
        if on == self._mode_on:
            return
        if on:
            self._mode.__enter__()
        else:
            self._mode.__exit__(None, None, None)
        self._mode_on = on

    def seen(
        self, entry: tuple[str, InfoFor], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        """One activation call in the innermost running container module's own code."""
        if not self._stack:
            return
        frame = self._stack[-1]
        fn, info_for = entry
        k = frame.calls.get(fn, 0)
        frame.calls[fn] = k + 1
        site = f"{frame.name}.{fn}#{k}"
        if k >= self._max_calls:
            site = f"{frame.name}.{fn}#{self._max_calls}+"
            if site not in self._aggregated:
                self._aggregated.add(site)
                log.warning(
                    "actmon: %s calls %s more than functional_max_calls=%d times in one"
                    " forward; calls %d and later are summarised together as layer %r",
                    frame.name,
                    fn,
                    self._max_calls,
                    self._max_calls,
                    site,
                )
        self._on_output(site, frame.module, lambda: info_for(args, kwargs), out)
