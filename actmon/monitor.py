"""The monitor: what ``actmon.watch`` returns. It drives the step/window cycle and the sinks.

Data flows one way: hooks (attach) -> kernels (stats) -> aggregator -> Snapshot -> sinks.
The monitor only decides *when*: which steps are sampled, when a window is flushed, and where
each Snapshot goes. Nothing it does on a training step reads a value back from the device.
"""

from __future__ import annotations

import functools
import logging
import numbers
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from actmon import distributed, lifecycle
from actmon.aggregate import Aggregator
from actmon.attach import Attacher, Layer, select_layers
from actmon.callbacks import CallbackRunner
from actmon.checks import attach_checks, loss_input_check
from actmon.config import Config, load_config
from actmon.errors import ArgumentError, ConfigError, HookError, MonitorStateError, describe_value
from actmon.nonfinite import NonFiniteAttribution
from actmon.rules import Alert, AlertError, RuleEngine
from actmon.sinks import Sink
from actmon.sinks.build import build_sinks
from actmon.sinks.runner import SinkRunner
from actmon.sinks.store import claim_run
from actmon.snapshot import LayerInfo, LayerStats, NonFinite, Snapshot, build_snapshot

log = logging.getLogger("actmon")

_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(method: _F) -> _F:
    """Mark a call in progress on the main thread, and act on a SIGTERM that arrived during it
    once it returns (see :mod:`actmon.lifecycle`)."""

    @functools.wraps(method)
    def call(self: Monitor, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not _MAIN:
            return method(self, *args, **kwargs)
        self._main_depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._main_depth -= 1
            if self._main_depth == 0:
                lifecycle.run_pending()

    return call  # type: ignore[return-value]


_MAIN = threading.main_thread()


class Monitor:
    """Watches one model; see :func:`watch`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        config: Any = None,
        *,
        extra_sinks: Iterable[Sink] = (),
        loss_fn: nn.Module | Callable[..., Tensor] | None = None,
        scaler: Any = None,
        process_group: Any = None,
        **overrides: Any,
    ) -> None:
        _check_arguments(model, loss_fn)
        if model in _WATCHED:
            raise MonitorStateError(
                f"{type(model).__name__} is already watched by an open monitor; close() it"
                " before calling watch() again"
            )
        self.config: Config = load_config(config, **overrides)
        # The name asked for; the run's own (unique) name is claimed before the sinks start.
        self.run = self.config.run_name or lifecycle.default_run_name()
        # torch.distributed: which rank exports what (None in a single process).
        self._dist = distributed.context(self.config.distributed, process_group)
        optimizers = _optimizers(optimizer)
        if scaler is not None and not optimizers:
            raise ConfigError(
                "watch(scaler=...): a GradScaler needs the optimizer too (watch(model,"
                " optimizer, scaler=scaler)); skipped steps are the optimizer steps it skips"
            )
        self._layers: list[Layer] = select_layers(model, self.config)
        self.errors: dict[str, int] = {}  # contained failures by where (layer, "sink:<name>")
        # Sinks report from their own threads; re-entrant: a SIGTERM may close the monitor
        # while a hook on the main thread holds it.
        self._errors_lock = threading.RLock()
        self.internal_errors_total = 0
        self._logged: set[str] = set()
        self._user_sinks = list(extra_sinks)
        self.history: deque[Snapshot] = deque(maxlen=self.config.history)
        self._step = 0  # completed steps
        self._in_window = 0
        self._flush_seconds = 0.0
        self._closed = False
        self._main_depth = 0  # calls of step/flush/close in progress on the main thread
        # Every layer's latest figures: a window in which a layer did not run carries them.
        self._latest_layers: dict[str, LayerStats] = {}
        n_params = sum(1 for p in model.parameters() if p.requires_grad)
        self._aggregator = Aggregator(
            len(self._layers), n_params, self.config.histogram.linear_bins, self.config.log_every
        )
        self._model_ref = weakref.ref(model)
        # Rules are validated first, then sinks start, then hooks attach: a rule naming an
        # unknown metric or no layer, or a sink that cannot start (a port in use with
        # port_in_use="error"), fails watch() before anything touches the model.
        self._engine = RuleEngine(list(self.config.rules), self.layers, self.config.quantiles)
        self.alerts: list[Alert] = []  # every event, firing and resolved (the last 10,000)
        self._active: dict[tuple[str, str | None], Alert] = {}  # by (rule, layer)
        self.should_stop = False  # set by a rule with the "stop" action
        self._callbacks = CallbackRunner(self._report_callback)
        self._pending_alerts: list[Alert] = []
        self._to_raise: Alert | None = None
        self._loss_hook: RemovableHandle | None = None
        self._runners: list[SinkRunner] = []
        # From here on watch() starts threads, a server and hooks: if any step fails, all
        # that was started is undone before the error reaches the caller (see _abort).
        try:
            self._start(model, optimizers, loss_fn, scaler)
        except BaseException:
            self._abort()
            raise

    def _start(
        self,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        loss_fn: nn.Module | Callable[..., Tensor] | None,
        scaler: Any,
    ) -> None:
        """Start the sinks, attach the hooks and run the model checks (watch()'s second half)."""
        dist = self._dist
        store_path, without = self._claim_run()
        if dist is None or dist.exports:  # reduce mode: rank 0 alone runs sinks
            named = build_sinks(
                self.config,
                self.run,
                lambda: self.layers,
                self._record_sink_error,
                rank=None if dist is None else dist.label,
                local_rank=0 if dist is None else dist.local_rank,
                store_path=store_path,
                without=without,
                dropped=lambda: (self.dropped_windows, self.dropped_alerts),
            )
            named += [(type(sink).__name__, sink) for sink in self._user_sinks]
            for name, sink in named:
                self._start_sink(name, sink)
        # Buffers live where the model's parameters are (the first tensor a hook sees may be an
        # odd one); a model without parameters gets them on its first summarised tensor.
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        if device is not None:
            self._aggregator.ensure_device(device)
        self._attacher = Attacher(
            model, self._layers, self._aggregator, self.config, optimizers, self._record_error
        )
        self._attacher.on_new_layer = self._layers_changed
        if dist is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            weights = distributed.param_weights(params, dist.world)
            self._attacher.share_norms(torch.from_numpy(weights))
            if dist.mode == "reduce":
                self._aggregator.reducer = distributed.Reducer(
                    dist,
                    weights,
                    distributed.Reducer.default_device(dist.group),
                    zero=() if self.config.gradients.histogram else ("grad_hist",),
                )
        self._attacher.scaler = scaler
        if not self.config.gradients.histogram:
            self._aggregator.skip_parts = ("grad_hist",)
        if self.config.checks:
            checked = self._loss_module(loss_fn)
            self._pending_alerts.extend(
                attach_checks(model, checked is not None, self._record_error)
            )
            if checked is not None:
                check = loss_input_check(
                    checked, self._pending_alerts.append, lambda: self._step + 1, self._record_error
                )
                if isinstance(loss_fn, nn.Module):
                    self._loss_hook = loss_fn.register_forward_pre_hook(check)
                else:  # a loss function: in `loss_fn(model(x), y)` it receives the model's output
                    self._loss_hook = model.register_forward_hook(
                        lambda _m, _args, output: check(checked, (output,))
                    )
        self._nonfinite = NonFiniteAttribution(
            self.config.escalate_on_nonfinite, logs=dist is None or dist.exports
        )
        _WATCHED.add(model)
        lifecycle.register(self)  # SIGTERM and interpreter exit close it too
        self._attacher.set_sampling(self._is_sampled())

    def _loss_module(self, loss_fn: nn.Module | Callable[..., Tensor] | None) -> nn.Module | None:
        """The loss module whose input the double-softmax check looks at: ``loss_fn`` itself,
        the module a known loss function stands for (``F.cross_entropy`` ->
        ``nn.CrossEntropyLoss``), or None (no loss, or a function the check does not know)."""
        if loss_fn is None or isinstance(loss_fn, nn.Module):
            return loss_fn
        equivalent = _FUNCTIONAL_LOSSES.get(loss_fn)
        if equivalent is None:
            self._log_once(
                "loss_fn",
                f"actmon: watch(loss_fn=...): {describe_value(loss_fn)} is not a loss the model"
                " checks know; its input is not checked (they know nn.CrossEntropyLoss,"
                " nn.BCEWithLogitsLoss, F.cross_entropy and F.binary_cross_entropy_with_logits)",
            )
            return None
        return equivalent()

    def _abort(self) -> None:
        """Undo a watch() that failed part-way: hooks out, sinks stopped (their threads, the
        metrics server and its socket), the model free to be watched again. Never raises:
        the caller re-raises the original error."""
        self._closed = True
        steps: list[Callable[[], None]] = []
        attacher = getattr(self, "_attacher", None)
        if attacher is not None:
            steps.append(attacher.remove)
        if self._loss_hook is not None:
            steps.append(self._loss_hook.remove)
        model = self._model_ref()
        if model is not None:
            steps.append(lambda: _WATCHED.discard(model))
        steps.append(lambda: lifecycle.release(self.run))
        steps.append(lambda: lifecycle.unregister(self))
        for runner in self._runners:
            if hasattr(runner.sink, "status"):
                runner.sink.status = "failed"
            steps.append(runner.close)
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep undoing; the original error is what matters
                log.warning("actmon: undoing a failed watch(): %s: %s", type(exc).__name__, exc)

    # ---- public API ----------------------------------------------------------------------
    @property
    def layers(self) -> list[LayerInfo]:
        """Every monitored layer: name, kind, unit axis and number of units."""
        attacher = getattr(self, "_attacher", None)  # rules are validated before hooks attach
        order = attacher.order if attacher is not None else range(len(self._layers))
        return [self._layers[i].public() for i in order]

    @property
    def active_alerts(self) -> list[Alert]:
        """The alerts firing now (fired and not resolved), oldest first: one per rule and
        layer, each the latest event of its alert (a run-level alert re-issued naming its
        layer is listed once, with the layer)."""
        return list(self._active.values())

    @property
    def step_count(self) -> int:
        """Training steps completed so far (calls of :meth:`step`)."""
        return self._step

    @property
    def first_nonfinite(self) -> NonFinite | None:
        """The run's first non-finite value: its step, source, and the first offending layer in
        forward order with the step that confirmed it (once a sampled step has named it)."""
        return self._nonfinite.first

    @property
    def overhead_seconds_total(self) -> float:
        """Host time spent in actmon's hooks and flushes (the monitor's own cost)."""
        return self._attacher.overhead_seconds + self._flush_seconds

    def on_alert(self, callback: Callable[[Alert], None]) -> None:
        """Call ``callback(alert)`` for every firing alert of rules with the "callback" action.

        Callbacks run on their own thread, in order, so a slow or stuck one cannot stall
        training; alerts that find 256 others waiting are not passed to them, and a callback
        that raises is counted (``monitor.errors``). ``close()`` waits for them at most 5 s.
        """
        self._callbacks.add(callback)

    @_guarded
    def step(self, loss: Tensor | float | None = None) -> Snapshot | None:
        """End a training step (call it after ``optimizer.step()``).

        Returns the window's Snapshot when this step ends a window, else None.
        """
        if self._closed:
            self._log_once("closed", "actmon: step() after close() is ignored")
            return None
        start = time.perf_counter()
        try:
            self._record_step(loss)
        except Exception as exc:
            self._record_error("(step)", exc)
        self._step += 1
        self._in_window += 1
        snapshot = None
        if self._in_window >= self.config.log_every:
            snapshot = self._flush()
        # The update ratio is measured once per window: on its first step, which is sampled.
        self._attacher.measure_update = self._in_window == 0
        self._attacher.set_sampling(self._is_sampled())
        self._flush_seconds += time.perf_counter() - start
        if self._to_raise is not None:  # a rule with the "raise" action fired
            alert, self._to_raise = self._to_raise, None
            raise AlertError(alert)
        return snapshot

    def snapshot(self) -> Snapshot | None:
        """The latest complete window (None before the first window ends)."""
        return self.history[-1] if self.history else None

    @_guarded
    def flush(self) -> Snapshot | None:
        """End the current window early (e.g. at the end of training); None if it is empty."""
        if self._in_window == 0:
            return None
        snapshot = self._flush()
        self._attacher.measure_update = True
        self._attacher.set_sampling(self._is_sampled())  # a new window starts sampled
        return snapshot

    def add_sink(self, sink: Sink, name: str | None = None) -> None:
        """Send every later Snapshot to ``sink`` too (run on its own thread, like the others).

        Ignored on ranks other than 0 under torch.distributed in "reduce" mode (rank 0 exports).
        """
        if self._dist is not None and not self._dist.exports:
            return
        self._start_sink(name or type(sink).__name__, sink)

    @property
    def sinks(self) -> dict[str, Sink]:
        return {runner.name: runner.sink for runner in self._runners}

    @property
    def prometheus_url(self) -> str | None:
        """The metrics endpoint (``http://127.0.0.1:PORT/metrics``) when that sink serves one."""
        sink = self.sinks.get("prometheus")
        return getattr(sink, "url", None)

    @property
    def delivered_windows(self) -> dict[str, int]:
        """Windows each sink has written so far."""
        return {runner.name: runner.delivered for runner in self._runners}

    @property
    def dropped_windows(self) -> dict[str, int]:
        """Windows each sink dropped (queue full, still failing after its retries, or left at
        the drain deadline). Also counted in ``errors`` as ``"dropped:<sink>"``, exported as
        ``actmon_dropped_windows_total{sink}`` and recorded in the run store."""
        return {runner.name: runner.dropped for runner in self._runners}

    @property
    def dropped_alerts(self) -> dict[str, int]:
        """Alerts each sink dropped (their own queue, of 10,000, was full; or still failing)."""
        return {runner.name: runner.dropped_alerts for runner in self._runners}

    @_guarded
    def close(self, status: str = "finished") -> None:
        """Flush the partial window, remove every hook, drain and close the sinks.

        Safe to call twice. ``status`` ("finished", "failed"; "terminated" on SIGTERM) is
        recorded in the run store. The sinks get ``sinks.drain_timeout_seconds`` in all to
        deliver what is queued (what is left then is dropped and counted).
        """
        if self._closed:
            return
        if status != "finished":  # another rank may be gone: no collective (it would hang)
            self._aggregator.reducer = None
        try:
            self.flush()
        finally:
            self._closed = True
            self._attacher.remove()
            if self._loss_hook is not None:
                self._loss_hook.remove()
            model = self._model_ref()
            if model is not None:
                _WATCHED.discard(model)
            lifecycle.release(self.run)
            self._callbacks.close()
            self._drain_sinks(status)
            lifecycle.unregister(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close("finished" if exc_type is None else "failed")

    # ---- internals -----------------------------------------------------------------------
    @property
    def _busy(self) -> bool:
        """Whether the main thread is inside one of this monitor's calls (a SIGTERM handled
        there waits until the call returns)."""
        return self._main_depth > 0

    def _end(self, status: str) -> None:
        """Close on SIGTERM ("terminated") or at interpreter exit: no collective (the other
        ranks may be gone), and nothing raised (the process is ending anyway)."""
        self._aggregator.reducer = None
        try:
            self.close(status)
        except Exception as exc:
            log.warning("actmon: closing run %s (%s) failed: %s", self.run, status, exc)

    def _drain_sinks(self, status: str) -> None:
        """Stop every sink at once and wait for them until one deadline. The store is told
        last, so the drops it records (``dropped_json``) are every other sink's final count."""
        deadline = time.monotonic() + self.config.sinks.drain_timeout_seconds
        last = [r for r in self._runners if hasattr(r.sink, "status")]
        first = [r for r in self._runners if r not in last]
        for runner in first:
            runner.stop()
        for runner in first:
            runner.join(deadline)
        for runner in last:
            runner.sink.status = status  # type: ignore[attr-defined]
            runner.stop()
        for runner in last:
            runner.join(deadline)

    def _claim_run(self) -> tuple[Path | None, tuple[str, ...]]:
        """Make ``self.run`` this run's own name, and say where it goes (one INFO line).

        Rank 0 (or the only process) claims it in its run store: the name asked for, else
        ``name-2``, ``name-3``, ... (taken by another run in that store, or by another open
        monitor of this process). Every rank takes rank 0's name (one broadcast), so their
        exports line up. Returns the claimed store path (None: no store, or not claimed here)
        and the sinks to leave out (the store, when its claim failed).
        """
        asked, dist, store = self.run, self._dist, self.config.sinks.store
        path: Path | None = None
        without: tuple[str, ...] = ()
        if dist is None or dist.rank == 0:
            if store.enabled:
                try:
                    self.run, path = claim_run(
                        store.path,
                        asked,
                        None if dist is None else dist.label,
                        self.config.model_dump_json(),
                        store.busy_timeout_seconds,
                        available=lifecycle.name_free,
                    )
                    lifecycle.reserve(self.run)
                except Exception as exc:  # an unwritable directory: train without the store
                    self._record_sink_error("store", exc)
                    without = ("store",)
            if path is None:
                self.run = lifecycle.reserve_unique(asked)
        if dist is not None:
            self.run = dist.same_on_all_ranks(self.run)
            if dist.rank != 0:
                lifecycle.reserve(self.run)
        if path is not None or dist is None or dist.rank == 0:
            taken = "" if self.run == asked else f" ({asked!r} was taken)"
            where = f"store {path}" if path is not None else "no run store"
            log.info("actmon: run %s%s, %s", self.run, taken, where)
        return path, without

    def _is_sampled(self) -> bool:
        """Whether the coming step takes full statistics.

        The schedule restarts with every window: its first step is sampled, then every
        ``sample_every``-th step of it (every step while escalated after a non-finite value no
        sampled layer explained). So every window holds at least one sampled step and so every
        layer's figures, whatever ``log_every`` and ``sample_every`` are; when ``log_every`` is
        a multiple of ``sample_every`` this is every ``sample_every``-th step of the run.
        """
        every = 1 if self._nonfinite.escalated else self.config.sample_every
        return self._in_window % every == 0

    def _loss_value(self, loss: Tensor | float | None) -> Tensor | None:
        """The step's loss as a device scalar, or None. A bad value is counted in ``errors``
        (logged once per kind of problem) and the step goes on without a loss; a loss with
        more than one element (per-sample losses) is reduced by its mean, with a warning once.
        """
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            if not (loss.is_floating_point() or loss.dtype in _INT_DTYPES):
                return self._bad_loss("dtype", f"a tensor of dtype {loss.dtype}")
            if loss.numel() == 0:
                return self._bad_loss("empty", f"an empty tensor of shape {tuple(loss.shape)}")
            if loss.numel() != 1:
                self._count_error("(step) loss")
                self._log_once(
                    "loss:reduced",
                    f"actmon: step(loss=...) got a tensor of shape {tuple(loss.shape)}; its"
                    " mean is recorded as the step's loss (pass loss.mean() to silence this)",
                )
                return loss.detach().float().mean()
            return loss.detach() if loss.is_floating_point() else loss.detach().float()
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):  # numpy floats are Real
            return self._bad_loss("type", f"{type(loss).__name__} {loss!r:.60}")
        return torch.tensor(float(loss))

    def _bad_loss(self, kind: str, got: str) -> Tensor | None:
        """Count and log (once per kind) a bad loss; None: the step has no loss."""
        self._count_error("(step) loss")
        if self.config.strict:
            raise HookError(f"step(loss=...): got {got}; give a float or a real tensor")
        self._log_once(
            f"loss:{kind}",
            f"actmon: step(loss=...) got {got}; the step is recorded without a loss (a float"
            " or a real-valued tensor is allowed; monitor.errors['(step) loss'] counts these)",
        )
        return None

    def _record_step(self, loss: Tensor | float | None) -> None:
        agg = self._aggregator
        total = self._attacher.end_step()
        loss_t = self._loss_value(loss)
        if loss_t is not None:
            agg.ensure_device(loss_t.device)
        agg.record_sentinel(loss_t, total)
        attacher = self._attacher
        skipped = None
        if attacher.scaler is not None and attacher.scaler.is_enabled():
            skipped = not attacher.stepped  # the scaler found Inf/NaN gradients
        agg.end_step(self._step + 1, attacher.sampling, skipped, attacher.grad_scale)
        attacher.stepped = False
        attacher.grad_scale = None

    def _flush(self) -> Snapshot | None:
        start = time.perf_counter()
        snapshot = None
        events: list[Alert] = []
        try:
            data = self._aggregator.flush(self._step, self._in_window)
            snapshot = build_snapshot(
                data,
                self.run,
                [layer.public() for layer in self._layers],
                list(zip(self._attacher.param_names, self._attacher.param_layers, strict=True)),
                self.config,
                self._aggregator.unit_offsets,
                order=self._attacher.order,
            )
            with self._errors_lock:
                errors = dict(self.errors)
            snapshot = replace(
                snapshot,
                layers=self._with_carried_layers(snapshot.layers),
                overhead_seconds_total=self.overhead_seconds_total,
                internal_errors=errors,
                dropped_windows=self.dropped_windows,
                rank=None if self._dist is None else self._dist.label,
                loss_scale=self._loss_scale(),
            )
            snapshot = self._nonfinite.observe(snapshot)
            self.history.append(snapshot)
            events = self._pending_alerts + self._engine.evaluate(snapshot)
            self._pending_alerts = []
        except Exception as exc:
            self._record_error("(flush)", exc)
        finally:
            self._in_window = 0
            self._flush_seconds += time.perf_counter() - start
        if snapshot is not None:
            for runner in self._runners:  # never blocks: each sink has its own thread
                runner.submit(snapshot)
            for alert in events:
                self._dispatch(alert)
        return snapshot

    def _loss_scale(self) -> float | None:
        """The GradScaler's current scale. ``get_scale()`` copies one scalar to the host: done
        once per window, right after the window's own copy has synchronised the device."""
        scaler = self._attacher.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return float(scaler.get_scale())

    def _with_carried_layers(self, fresh: dict[str, LayerStats]) -> dict[str, LayerStats]:
        """Every layer seen so far, in display order: this window's figures, and for a layer
        that did not run in it, its latest ones (their ``as_of_step`` says which window)."""
        self._latest_layers.update(fresh)
        if len(fresh) == len(self._latest_layers):
            return fresh
        names = [self._layers[i].name for i in self._attacher.order]
        return {n: self._latest_layers[n] for n in names if n in self._latest_layers}

    def _layers_changed(self) -> None:
        """A functional activation became a layer: rules select from the new list."""
        self._engine.set_layers(self.layers)

    def _dispatch(self, alert: Alert) -> None:
        """Record an alert event and carry out its rule's actions."""
        self.alerts.append(alert)
        del self.alerts[:-10_000]
        key = (alert.rule, alert.layer)
        if alert.state == "firing":
            if alert.layer is not None:  # a run-level alert re-issued naming its layer
                self._active.pop((alert.rule, None), None)
            self._active[key] = alert
        else:
            self._active.pop(key, None)
        for runner in self._runners:
            runner.submit(alert)
        actions = alert.actions
        if "log" in actions and self._exports:
            level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}[
                alert.severity
            ]
            log.log(
                level if alert.state == "firing" else logging.INFO,
                "actmon alert: %s",
                alert.message(),
            )
        if alert.state != "firing":
            return
        if "callback" in actions:
            self._callbacks.submit(alert)  # never blocks: the callbacks have their own thread
        if "stop" in actions:
            self.should_stop = True
        if "raise" in actions and self._to_raise is None:
            self._to_raise = alert

    @property
    def _exports(self) -> bool:
        """Whether this process exports and logs: not the ranks other than 0 of a reduced run
        (they hold the same windows and alerts as rank 0; logging them too repeats each line)."""
        return self._dist is None or self._dist.exports

    def _start_sink(self, name: str, sink: Sink) -> None:
        sinks = self.config.sinks
        self._runners.append(
            SinkRunner(
                name,
                sink,
                self._record_sink_error,
                sinks.queue_size,
                sinks.retries,
                sinks.backoff_seconds,
                on_drop=self._record_drop,
            )
        )

    def _report_callback(self, where: str, message: str) -> None:
        """Alert callbacks' failures and drops (from their thread): counted, logged once."""
        self._count_error(where)
        self._log_once(where, message)

    def _record_drop(self, name: str, count: int) -> None:
        """A sink dropped a window or an alert (its runner logs it, rate-limited)."""
        where = f"dropped:{name}"
        with self._errors_lock:
            self.errors[where] = self.errors.get(where, 0) + count
            self.internal_errors_total += count

    def _count_error(self, where: str) -> None:
        with self._errors_lock:  # hooks may run on autograd's threads, sinks on their own
            self.errors[where] = self.errors.get(where, 0) + 1
            self.internal_errors_total += 1

    def _record_sink_error(self, name: str, exc: BaseException) -> None:
        """Sink failures are counted and logged, never raised (they happen off-thread)."""
        where = f"sink:{name}"
        with self._errors_lock:
            self.errors[where] = self.errors.get(where, 0) + 1
            self.internal_errors_total += 1
        self._log_once(where, f"actmon: sink {name} failed: {type(exc).__name__}: {exc}")

    def _record_error(self, where: str, exc: BaseException) -> None:
        if self.config.strict:
            if isinstance(exc, HookError):
                raise exc
            raise HookError(f"{where}: {type(exc).__name__}: {exc}") from exc
        with self._errors_lock:  # hooks may run on autograd's threads
            self.errors[where] = self.errors.get(where, 0) + 1
            self.internal_errors_total += 1
        self._log_once(
            where, f"actmon: {where} skipped after an error: {type(exc).__name__}: {exc}"
        )

    def _log_once(self, key: str, message: str) -> None:
        with self._errors_lock:  # sinks and alert callbacks log from their own threads
            if key in self._logged:
                return
            self._logged.add(key)
        log.warning(message)


# Loss functions the double-softmax check knows, by the module that does the same.
_FUNCTIONAL_LOSSES: dict[Callable[..., Tensor], type[nn.Module]] = {
    torch.nn.functional.cross_entropy: nn.CrossEntropyLoss,
    torch.nn.functional.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}


def _check_arguments(model: object, loss_fn: object) -> None:
    """watch()'s arguments of the wrong type fail at once, naming what was given."""
    if not isinstance(model, nn.Module):
        hint = ""
        if callable(model) and not isinstance(model, type):
            hint = "; to watch a function's activations, call it inside an nn.Module's forward"
        elif isinstance(model, type) and issubclass(model, nn.Module):
            hint = f"; pass an instance, e.g. {model.__name__}(...), not the class"
        raise ArgumentError(
            f"watch(model=...): got {describe_value(model)}; a torch.nn.Module is allowed (the"
            f" model whose layers are watched){hint}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(
            f"watch(loss_fn=...): got {describe_value(loss_fn)}; a loss module (e.g."
            " nn.CrossEntropyLoss()), a loss function (e.g. F.cross_entropy) or None is allowed"
        )


def _optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    """The torch optimizers given to watch() (one, a list or tuple of them, or None)."""
    if optimizer is None:
        return []
    many = isinstance(optimizer, Sequence) and not isinstance(optimizer, str | bytes)
    items = list(optimizer) if many else [optimizer]  # type: ignore[call-overload]
    out = []
    for i, item in enumerate(items):
        inner = _unwrap(item)
        if not isinstance(inner, torch.optim.Optimizer):
            where = f"optimizer[{i}]" if many else "optimizer"
            raise ArgumentError(
                f"watch({where}=...): got {describe_value(item)}; a torch.optim.Optimizer"
                " (or a framework's wrapper of one), a list of them, or None is allowed"
            )
        out.append(inner)
    return out


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer), whose step hooks are the ones that fire."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    config: Any = None,
    *,
    extra_sinks: Iterable[Sink] = (),
    loss_fn: nn.Module | Callable[..., Tensor] | None = None,
    scaler: Any = None,
    process_group: Any = None,
    **overrides: Any,
) -> Monitor:
    """Attach actmon to every leaf layer of ``model``.

    ``config`` is a YAML path, a dict or an :class:`~actmon.config.Config`; ``ACTMON_CONFIG`` and
    keyword ``overrides`` (e.g. ``log_every=5``) take precedence over it, in that order. Give the
    ``optimizer`` to get gradient norms after accumulation and update-to-weight ratios.
    The built-in sinks are configured under ``sinks`` (e.g. ``sinks={"prometheus":
    {"enabled": True}}``); ``extra_sinks`` adds objects with ``write(snapshot)``/``close()``.
    Pass the ``loss_fn`` to let the model checks look at what the loss receives: a loss module
    is checked on its input; a loss function (``F.cross_entropy``,
    ``F.binary_cross_entropy_with_logits``) on the model's output, which is what it receives in
    ``loss_fn(model(x), y)``.
    With mixed precision pass the ``scaler`` (``torch.amp.GradScaler``): output-gradient
    statistics are unscaled, and steps it skips (overflowed gradients) are counted as
    ``amp_skipped_steps`` instead of raising a NaN alarm.

    Under ``torch.distributed`` call it on every rank, after wrapping the model (DDP,
    ``fully_shard``); layer and parameter names are those of the unwrapped model. By default
    (``distributed="reduce"``) each window is reduced over the ranks of ``process_group`` (the
    default group if None) when it ends, every rank gets the same Snapshot, and only rank 0
    runs sinks (built-in, ``extra_sinks`` and ``add_sink``); every rank must then call
    ``step()`` and ``flush()`` equally often. ``distributed="per_rank"`` exports each rank's
    own view instead (see :mod:`actmon.distributed`).
    """
    return Monitor(
        model,
        optimizer,
        config,
        extra_sinks=extra_sinks,
        loss_fn=loss_fn,
        scaler=scaler,
        process_group=process_group,
        **overrides,
    )


__all__ = ["Monitor", "watch"]
