"""One error hierarchy: every error names the field or layer, the value, and what is allowed."""

from __future__ import annotations


class ActmonError(Exception):
    """Base class of every error actmon raises."""


class ConfigError(ActmonError, ValueError):
    """A configuration file, dict or keyword override holds an unknown key or a bad value."""


class HookError(ActmonError, RuntimeError):
    """A hook could not summarise a layer's tensor (raised only with ``strict=True``)."""


class MonitorStateError(ActmonError, RuntimeError):
    """The monitor was used in a way its life cycle does not allow (e.g. watching a model twice)."""
