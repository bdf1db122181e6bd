"""Configuration: pydantic models, YAML files, the ``ACTMON_CONFIG`` variable and keyword overrides.

Precedence, lowest first: the defaults declared here < the ``config=`` argument (a YAML path, a
dict or a :class:`Config`) < the YAML file named by ``ACTMON_CONFIG`` < keyword overrides.
Every error names the field, the value it got and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actmon.errors import ArgumentError, ConfigError, describe_value
from actmon.kinds import Kind
from actmon.rules import DEFAULT_RULES, Rule

ENV_VAR = "ACTMON_CONFIG"

# Bounds on a config file, so no YAML input can hang or exhaust the process: its size, its
# nesting depth and the number of nodes it holds once aliases are expanded (a "billion laughs"
# document is a few hundred bytes that expand to 10**9 nodes). A real config is a few hundred
# nodes, 4 levels deep; a kinds map for 10,000 layers is 20,000 nodes.
MAX_YAML_CHARS = 1_000_000
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


class _Strict(BaseModel):
    """Unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class HistogramConfig(_Strict):
    """How histograms are exported. Binning on the device is fixed, so windows and ranks merge."""

    # Symmetric-log view: |x| < 2**min_exp (zeros included) share the centre bin; |x| >= 2**max_exp
    # is clamped into the outermost bins. Non-finite values are counted apart, never binned.
    min_exp: int = Field(-24, ge=-126, le=127)
    max_exp: int = Field(24, ge=-126, le=127)
    # Sub-bins per power of two in the exported view (the device keeps 4; coarser views merge them).
    bins_per_octave: Literal[1, 2, 4] = 4
    # Bounded kinds (sigmoid, tanh, clipping, softmax): equal-width bins over their output range.
    linear_bins: int = Field(32, ge=1, le=4096)

    @model_validator(mode="after")
    def _range(self) -> HistogramConfig:
        if self.min_exp >= self.max_exp:
            raise ValueError(
                f"min_exp ({self.min_exp}) must be smaller than max_exp ({self.max_exp})"
            )
        return self


class GradientsConfig(_Strict):
    """Which gradient statistics are taken on sampled steps."""

    output: bool = (
        True  # norms of each layer's output gradient (tensor hooks from the forward hook)
    )
    parameters: bool = True  # per-parameter and per-layer gradient and weight norms
    # ||w_after - w_before|| / ||w|| per layer, measured on the first step of each window. It needs
    # a transient copy of the parameters during that optimizer step, and an optimizer to hook.
    update_ratio: bool = True
    # Histograms of output gradients too (NaN/Inf counts are exact either way). Binning costs
    # ~0.7 ns per element on a CPU, so it is off by default.
    histogram: bool = False


class ConsoleSinkConfig(_Strict):
    """The live console view (rich)."""

    # "auto": on when stdout is a terminal, off in non-interactive runs (CI logs stay clean).
    enabled: bool | Literal["auto"] = "auto"


class TensorBoardSinkConfig(_Strict):
    """TensorBoard event files: scalars ``actmon.<metric>/<layer>``, pre-binned histograms."""

    enabled: bool = False
    # {run} is replaced by the run name, {rank} by the rank (distributed: per_rank puts each
    # rank under rank<N>/ when the template has no {rank}).
    log_dir: str = "runs/{run}/tensorboard"
    histograms: bool = True


class PrometheusSinkConfig(_Strict):
    """Prometheus: an HTTP endpoint to scrape, or pushes to a Pushgateway."""

    enabled: bool = False
    mode: Literal["endpoint", "pushgateway"] = "endpoint"
    host: str = "127.0.0.1"  # loopback by default: exposing metrics is the user's choice
    port: int = Field(9464, ge=0, le=65535)  # 0 picks a free port (see monitor.prometheus_url)
    # When the port is taken: pick a free one and log it, turn the sink off, or fail watch().
    port_in_use: Literal["fallback", "disable", "error"] = "fallback"
    pushgateway_url: str = "http://127.0.0.1:9091"
    job: str = "actmon"
    max_layer_series: int = Field(500, ge=1)  # beyond it: worst layers first, the rest "_other"
    # Activation histograms as Prometheus histograms (actmon_activation_bucket, 27 fixed
    # log-spaced buckets per layer) for the layers matching these globs, in forward order, up
    # to max_histogram_layers (each costs 29 series). Off by default: [] exports none.
    histogram_layers: list[str] = Field(default_factory=list)
    max_histogram_layers: int = Field(32, ge=1, le=1000)
    # TLS for the endpoint (prometheus_client's own support): a certificate and its key, and
    # optionally a CA whose client certificates are then required (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Basic auth for Pushgateway pushes; the password is read from this environment variable,
    # never from a file. (prometheus_client's endpoint offers TLS, not basic auth.)
    pushgateway_username: str | None = None
    pushgateway_password_env: str = "ACTMON_PUSHGATEWAY_PASSWORD"

    @model_validator(mode="after")
    def _tls_pair(self) -> PrometheusSinkConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self


class StoreSinkConfig(_Strict):
    """The SQLite run store that ``actmon gate`` and ``actmon report`` read."""

    enabled: bool = True
    path: str = "runs/{run}/actmon.db"  # {run}, {rank}: as for tensorboard.log_dir
    # How long a write waits for a lock another process holds before it fails (and is retried
    # by the sink runner with back-off): waiting happens on the sink's thread, not training's.
    busy_timeout_seconds: float = Field(5.0, gt=0)


class SinksConfig(_Strict):
    """Where Snapshots go. Every sink runs off the training thread behind a bounded queue."""

    console: ConsoleSinkConfig = Field(default_factory=ConsoleSinkConfig)
    tensorboard: TensorBoardSinkConfig = Field(default_factory=TensorBoardSinkConfig)
    prometheus: PrometheusSinkConfig = Field(default_factory=PrometheusSinkConfig)
    store: StoreSinkConfig = Field(default_factory=StoreSinkConfig)
    queue_size: int = Field(
        64, ge=1
    )  # windows waiting per sink; beyond it the oldest wait, new drop
    retries: int = Field(3, ge=0)  # attempts after a failure, with exponential back-off
    backoff_seconds: float = Field(0.5, gt=0)  # first back-off; doubles up to 30 s
    # At close(), on SIGTERM and at interpreter exit: how long the sinks may take, all together,
    # to deliver what is queued; what is left then is dropped and counted. Under a scheduler's
    # grace period (30 s by default in Kubernetes and Slurm) before its SIGKILL.
    drain_timeout_seconds: float = Field(20.0, gt=0)


class GateLayerLimits(_Strict):
    """Per-layer overrides of the gate's limits."""

    dead: float | None = Field(None, ge=0, le=1)
    saturated: float | None = Field(None, ge=0, le=1)


class GateConfig(_Strict):
    """What ``actmon gate`` allows in a finished run (the final window of each layer)."""

    max_dead: float | None = Field(0.3, ge=0, le=1)  # dead_fraction per ReLU-family layer
    max_saturated: float | None = Field(0.5, ge=0, le=1)  # saturation_fraction per layer
    allow_nonfinite: bool = False  # any NaN/Inf anywhere in the run fails the gate
    per_layer: dict[str, GateLayerLimits] = Field(default_factory=dict)  # glob -> limits
    baseline_tolerance: float = Field(0.05, ge=0)  # --baseline: allowed rise per layer
    allow_unfinished: bool = False  # accept a run left 'running' or 'terminated'
    # Any alert of this severity or above that fired fails the gate ("none": alerts never do).
    fail_on: Literal["info", "warning", "critical", "none"] = "critical"
    # Vanishing gradients: the final window's first/last layer gradient-norm ratio below this.
    min_grad_depth_ratio: float | None = Field(1e-4, ge=0)
    # Exploding gradients: a window's largest total gradient norm over this many times the
    # median of the windows before it (the exploding_gradients rule's threshold).
    max_grad_spike: float | None = Field(100.0, gt=1)


class Config(_Strict):
    """Everything a monitor can be told. Defaults are chosen to stay on during real training."""

    # default: "actmon-<UTC date>-<time>-<ms>"; a name its store already holds gets "-2", ...
    run_name: str | None = None
    log_every: int = Field(20, ge=1)  # steps per window; one device-to-host copy per window
    # Full statistics on the first step of every window and then every n-th step of it; 1 =
    # every step ("full coverage"). Every window so holds every layer's figures; with n >=
    # log_every that is one sampled step per window. The loss and total gradient norm are
    # recorded on every step.
    sample_every: int = Field(20, ge=1)
    include: list[str] = Field(default_factory=lambda: ["*"])  # fnmatch globs on module names
    exclude: list[str] = Field(default_factory=list)
    kinds: dict[str, Kind] = Field(default_factory=dict)  # glob -> kind override
    unit_axis: dict[str, int] = Field(default_factory=dict)  # glob -> unit axis override
    saturation_eps: float = Field(0.01, gt=0.0, lt=0.5)
    quantiles: list[float] = Field(
        default_factory=lambda: [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    )
    histogram: HistogramConfig = Field(default_factory=HistogramConfig)
    gradients: GradientsConfig = Field(default_factory=GradientsConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    # Alert rules (see actmon.rules and the documented pack in configs/default.yaml). A list
    # given in a file or override replaces the default pack.
    rules: list[Rule] = Field(default_factory=lambda: [r.model_copy() for r in DEFAULT_RULES])
    checks: bool = True  # model checks at attach / first loss call (double softmax, init, ...)
    # Activation functions called in a forward (F.relu, torch.sigmoid, ...) are layers too,
    # named "<module>.<fn>#<k>" (actmon.functional).
    functional: bool = True
    # Calls of one function beyond this many in one module's forward (an RNN's tanh per time
    # step) are one layer "<module>.<fn>#<n>+", so the layer count stays bounded.
    functional_max_calls: int = Field(16, ge=1)
    gate: GateConfig = Field(default_factory=GateConfig)  # read by `actmon gate` only
    skip_no_grad: bool = True  # forwards under torch.no_grad() (evaluation) are not recorded
    escalate_on_nonfinite: bool = True  # sample every step after a window saw a non-finite loss
    # Under torch.distributed (more than one rank; ignored otherwise). "reduce": each window is
    # reduced over the ranks at its flush (a unit is dead only when dead on every rank), every
    # rank gets the same Snapshot, and rank 0 alone runs sinks. "per_rank": no collectives;
    # every rank exports its own view with a `rank` label (see actmon.distributed).
    distributed: Literal["reduce", "per_rank"] = "reduce"
    history: int = Field(100, ge=1)  # snapshots kept in ``monitor.history``
    strict: bool = False  # raise on a hook failure instead of skipping the layer (tests use it)

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, value: list[float]) -> list[float]:
        for q in value:
            if not 0.0 < q < 1.0:
                raise ValueError(f"quantile {q} is outside (0, 1)")
        return sorted(set(value))

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for glob in value:
            if not glob:
                raise ValueError("an empty glob matches nothing; use '*' for every layer")
        return value


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    **overrides: Any,
) -> Config:
    """Build a :class:`Config` from defaults, ``source``, ``$ACTMON_CONFIG`` and ``overrides``."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if isinstance(source, Config):
        layers.append(("the Config object", source.model_dump(exclude_unset=True)))
    elif isinstance(source, Mapping):
        layers.append(("the config dict", dict(source)))
    elif isinstance(source, str | os.PathLike):
        layers.append(_read_yaml(Path(source)))
    elif source is not None:
        raise ArgumentError(
            f"config: got {describe_value(source)}; a YAML file path (str or os.PathLike), a"
            " dict, an actmon.Config or None is allowed"
        )
    env_path = os.environ.get(ENV_VAR)
    if env_path:
        try:
            origin, data = _read_yaml(Path(env_path))
        except ConfigError as exc:
            raise ConfigError(
                f"${ENV_VAR}={env_path!r}: {exc} (point ${ENV_VAR} at an actmon YAML config, or"
                " unset it)"
            ) from None
        layers.append((f"{origin} (from ${ENV_VAR})", data))
    if overrides:
        layers.append(("keyword overrides", overrides))
    merged: dict[str, Any] = {}
    for origin, data in layers:
        _validate_layer(origin, data)
        merged = _deep_merge(merged, data)
    return _validate(merged, " and ".join(origin for origin, _ in layers) or "defaults")


class _YamlLimit(Exception):
    """A document over one of the bounds above."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting while it composes (before Python's
    recursion limit) and documents whose aliases expand past MAX_YAML_NODES nodes, before
    any object is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"it nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_nodes(node, {}, set())
        return node


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many nodes ``node`` is once aliases are copied out (each distinct node is counted
    once, so this is linear in the document); raises _YamlLimit past MAX_YAML_NODES or on an
    alias that contains itself. Recursion is bounded by MAX_YAML_DEPTH."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _YamlLimit("an alias refers to a node that contains it (a recursive document)")
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        total += _expanded_nodes(child, sizes, open_)
        if total > MAX_YAML_NODES:
            raise _YamlLimit(
                f"its aliases expand it to more than {MAX_YAML_NODES:,} nodes (a YAML bomb?)"
            )
    open_.discard(key)
    sizes[key] = total
    return total


def _read_yaml(path: Path) -> tuple[str, dict[str, Any]]:
    origin = str(path)
    try:
        with path.open(encoding="utf-8") as fh:
            text = fh.read(MAX_YAML_CHARS + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {origin!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {origin!r} cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {origin!r} is not UTF-8 text: {exc}") from None
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(
            f"config file {origin!r} is refused: it is over {MAX_YAML_CHARS:,} characters"
        )
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: no python tags
    except _YamlLimit as exc:
        raise ConfigError(f"config file {origin!r} is refused: {exc}") from None
    except RecursionError:  # a bound above should come first; never a traceback
        raise ConfigError(f"config file {origin!r} is refused: it nests too deeply") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {origin!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {origin!r} must hold a mapping of fields at the top level,"
            f" got {type(data).__name__}"
        )
    return origin, data


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _validate_layer(origin: str, data: Mapping[str, Any]) -> None:
    """Validate one source alone so a field's error names the file or argument that holds it.

    Errors between fields (which may come from different sources) are left to the merged check.
    """
    try:
        Config.model_validate(dict(data))
    except ValidationError as exc:
        if any(err["loc"] for err in exc.errors()):
            raise ConfigError(_describe(exc, origin)) from None


def _validate(data: dict[str, Any], origin: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


# A field's value in an error message: short, however large the value is (reprlib does not
# build the whole repr first).
_VALUE = reprlib.Repr()
_VALUE.maxlevel, _VALUE.maxlist, _VALUE.maxdict, _VALUE.maxtuple = 3, 10, 10, 10
_VALUE.maxstring, _VALUE.maxother, _VALUE.maxlong = 120, 120, 60
_MAX_ERRORS = 10  # lines of field errors in one message


def _describe(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid actmon config in {origin}:"]
    errors = exc.errors()
    for err in errors[:_MAX_ERRORS]:
        path = ".".join(str(part) for part in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(
                f"  field {path!r}: unknown field{suggestion}; allowed: {', '.join(allowed)}"
            )
            continue
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  field {path!r}: got {_VALUE.repr(err.get('input'))}; {message}")
    if len(errors) > _MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - _MAX_ERRORS:,} more errors")
    return "\n".join(lines)


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
