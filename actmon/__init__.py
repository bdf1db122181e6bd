"""actmon: a training-time activation health monitor for PyTorch.

>>> monitor = actmon.watch(model, optimizer=opt, config="configs/default.yaml")
>>> ...; monitor.step(loss=loss)
>>> monitor.snapshot().layers["encoder.2"].dead_fraction
"""

from actmon.config import Config, load_config
from actmon.errors import (
    ActmonError,
    ArgumentError,
    ConfigError,
    HookError,
    MonitorStateError,
)
from actmon.kinds import Kind
from actmon.monitor import Monitor, watch
from actmon.rules import Alert, AlertError, Rule
from actmon.snapshot import LayerInfo, LayerStats, NonFinite, ParamStats, Snapshot

__version__ = "0.1.0"

__all__ = [
    "ActmonError",
    "Alert",
    "AlertError",
    "ArgumentError",
    "Config",
    "ConfigError",
    "HookError",
    "Kind",
    "LayerInfo",
    "LayerStats",
    "Monitor",
    "MonitorStateError",
    "NonFinite",
    "ParamStats",
    "Rule",
    "Snapshot",
    "__version__",
    "load_config",
    "watch",
]
