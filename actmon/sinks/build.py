"""Build the sinks a config asks for (``sinks:``), each ready to be run by a SinkRunner."""

from __future__ import annotations

import sys
from collections.abc import Callable

from actmon.config import Config
from actmon.errors import ConfigError
from actmon.sinks import Sink
from actmon.snapshot import LayerInfo


def build_sinks(
    config: Config,
    run: str,
    layers: Callable[[], list[LayerInfo]],
    on_error: Callable[[str, BaseException], None],
) -> list[tuple[str, Sink]]:
    """(name, sink) for every enabled sink that could start, in the order they receive windows.

    A sink that cannot start (an unwritable directory, say) is reported to ``on_error`` and left
    out; training goes on without it. Only a ConfigError (e.g. ``port_in_use: error``) is raised.
    """
    cfg = config.sinks
    makers: list[tuple[str, Callable[[], Sink]]] = []
    if cfg.store.enabled:

        def store() -> Sink:
            from actmon.sinks.store import StoreSink

            path = cfg.store.path.format(run=run)
            return StoreSink(
                path, run, config.model_dump_json(), layers, cfg.store.busy_timeout_seconds
            )

        makers.append(("store", store))
    if cfg.prometheus.enabled:

        def prometheus() -> Sink:
            from actmon.sinks.prometheus import PrometheusSink

            return PrometheusSink(cfg.prometheus, run)

        makers.append(("prometheus", prometheus))
    if cfg.tensorboard.enabled:

        def tensorboard() -> Sink:
            from actmon.sinks.tensorboard import TensorBoardSink

            log_dir = cfg.tensorboard.log_dir.format(run=run)
            return TensorBoardSink(log_dir, cfg.tensorboard.histograms)

        makers.append(("tensorboard", tensorboard))
    console = cfg.console.enabled
    if console is True or (console == "auto" and sys.stdout.isatty()):

        def console_sink() -> Sink:
            from actmon.sinks.console import ConsoleSink

            return ConsoleSink(worst=8)

        makers.append(("console", console_sink))
    sinks: list[tuple[str, Sink]] = []
    for name, make in makers:
        try:
            sinks.append((name, make()))
        except ConfigError:
            raise
        except Exception as exc:
            on_error(name, exc)
    return sinks
