"""Build the sinks a config asks for (``sinks:``), each ready to be run by a SinkRunner."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from actmon.config import Config
from actmon.errors import ConfigError
from actmon.sinks import Sink
from actmon.sinks.paths import rank_path
from actmon.snapshot import LayerInfo

log = logging.getLogger("actmon")


def build_sinks(
    config: Config,
    run: str,
    layers: Callable[[], list[LayerInfo]],
    on_error: Callable[[str, BaseException], None],
    rank: int | None = None,
    local_rank: int = 0,
    store_path: Path | None = None,
    without: Collection[str] = (),
    dropped: Callable[[], tuple[dict[str, int], dict[str, int]]] = lambda: ({}, {}),
) -> list[tuple[str, Sink]]:
    """(name, sink) for every enabled sink that could start, in the order they receive windows.

    A sink that cannot start (an unwritable directory, say) is reported to ``on_error`` and left
    out; training goes on without it. Only a ConfigError (e.g. ``port_in_use: error``) is raised.

    ``rank`` is set when each rank exports its own view (``distributed: per_rank``): the store
    and TensorBoard paths get a ``rank<N>`` directory (unless they hold ``{rank}``), Prometheus
    series a ``rank`` label, the endpoint port is offset by ``local_rank`` (ranks sharing a
    machine), and only rank 0 shows the console view.

    ``store_path``: where ``run`` was claimed (:func:`actmon.sinks.store.claim_run`); None: the
    store sink claims exactly ``run`` itself (a rank joining rank 0's run). ``without``: sinks
    left out (one whose start already failed and was reported). ``dropped``: what each sink
    has dropped so far (windows, alerts), which the store records.
    """
    cfg = config.sinks
    makers: list[tuple[str, Callable[[], Sink]]] = []
    if cfg.store.enabled and "store" not in without:

        def store() -> Sink:
            from actmon.sinks.store import StoreSink, claim_run

            path = store_path
            config_json = config.model_dump_json()
            timeout = cfg.store.busy_timeout_seconds
            if path is None:
                _, path = claim_run(cfg.store.path, run, rank, config_json, timeout, exact=True)
            return StoreSink(path, run, config_json, layers, timeout, dropped)

        makers.append(("store", store))
    if cfg.prometheus.enabled:

        def prometheus() -> Sink:
            from actmon.sinks.prometheus import PrometheusSink

            prom = cfg.prometheus
            if rank is not None and prom.mode == "endpoint" and prom.port:
                prom = prom.model_copy(update={"port": prom.port + local_rank})
            return PrometheusSink(prom, run, rank=rank)

        makers.append(("prometheus", prometheus))
    if cfg.tensorboard.enabled:

        def tensorboard() -> Sink:
            from actmon.sinks.tensorboard import TensorBoardSink

            log_dir = rank_path(cfg.tensorboard.log_dir, run, rank, directory=True)
            return TensorBoardSink(log_dir, cfg.tensorboard.histograms)

        makers.append(("tensorboard", tensorboard))
    console = cfg.console.enabled
    if (console is True or (console == "auto" and sys.stdout.isatty())) and not rank:

        def console_sink() -> Sink:
            from actmon.sinks.console import ConsoleSink

            return ConsoleSink(worst=8)

        makers.append(("console", console_sink))
    sinks: list[tuple[str, Sink]] = []
    for name, make in makers:
        try:
            sinks.append((name, make()))
        except ConfigError:
            close_all(sinks)  # watch() fails: the sinks made before this one are undone
            raise
        except Exception as exc:
            on_error(name, exc)
    return sinks


def close_all(sinks: list[tuple[str, Sink]]) -> None:
    """Close sinks that never ran (a watch() that failed), as a failed run; never raises."""
    for name, sink in sinks:
        if hasattr(sink, "status"):
            sink.status = "failed"
        try:
            sink.close()
        except Exception as exc:
            log.warning("actmon: closing sink %s after a failed watch(): %s", name, exc)
