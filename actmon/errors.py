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


class ArgumentError(ActmonError, TypeError):
    """An argument of an actmon call has a type it does not accept (``watch(fn)``,
    ``optimizer="adam"``, ``config=3``); the message names the argument, what it got and
    what is allowed."""


def describe_value(value: object, limit: int = 60) -> str:
    """What a bad argument is, for an error message: its type and a short repr."""
    import reprlib

    name = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(name, str) and not isinstance(value, type):
        return f"the function {name!r}"
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    text = short.repr(value)
    return f"{type(value).__name__} {text}"
