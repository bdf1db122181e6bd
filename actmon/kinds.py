"""Layer kinds: what a leaf module computes decides which health statistics apply to it.

A kind is inferred from the module's class (and, for classes we do not know, from its class
name, so Hugging Face's ``NewGELUActivation`` or ``LlamaRMSNorm`` classify correctly) and can be
overridden per layer in the config.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn


class Kind(str, enum.Enum):
    """What a layer computes, as far as activation health is concerned."""

    RELU = "relu"  # exact zeros below 0: units can die
    LEAKY = "leaky"  # LeakyReLU / PReLU / ELU / SELU / CELU: units can go dormant (never > 0)
    SMOOTH_GATED = "smooth_gated"  # GELU / SiLU / Mish / Hardswish: dormant if never > 0
    SIGMOID = "sigmoid"  # bounded (0, 1): saturates near 0 and 1
    TANH = "tanh"  # bounded (-1, 1): saturates near +-1
    CLIPPING = "clipping"  # Hardtanh / ReLU6 / Hardsigmoid: saturates at its clip bounds
    SOFTMAX = "softmax"  # rows of probabilities: max-probability and entropy
    LINEAR = "linear"  # Linear / Conv / Embedding-free projections: pre-activations
    NORM = "norm"  # BatchNorm / LayerNorm / GroupNorm / RMSNorm
    OTHER = "other"  # dropout, pooling, embeddings, anything else


# Kinds whose per-unit "ever > 0" mask is tracked: dead (relu) or dormant (leaky, smooth) units.
DEAD_KINDS = frozenset({Kind.RELU})
DORMANT_KINDS = frozenset({Kind.LEAKY, Kind.SMOOTH_GATED})
SATURATING_KINDS = frozenset({Kind.SIGMOID, Kind.TANH, Kind.CLIPPING})
BOUNDED_KINDS = frozenset({Kind.SIGMOID, Kind.TANH, Kind.CLIPPING, Kind.SOFTMAX})


@dataclass(frozen=True)
class KindInfo:
    """The kind of one module plus the constants its statistics need."""

    kind: Kind
    bounds: tuple[float, float] | None = None  # output range, for bounded kinds
    softmax_dim: int | None = None  # the probability axis, for softmax layers
    log_softmax: bool = False
    unit_axis: int | None = None  # fixed unit axis for producers (conv: 1, linear: -1)

    @property
    def tracks_units(self) -> bool:
        """Whether this kind keeps a per-unit "ever active" mask (dead/dormant units)."""
        if self.kind in DEAD_KINDS or self.kind in DORMANT_KINDS:
            return True
        # ReLU6 / Hardsigmoid clip at 0 from below: their units die like a ReLU's.
        return self.kind is Kind.CLIPPING and self.bounds is not None and self.bounds[0] == 0.0


_RELU = (nn.ReLU,)
_LEAKY = (nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU)
_SMOOTH = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)
_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_CHANNEL_NORM = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_LAST_NORM = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_LAST_AXIS_OTHER = (nn.Embedding, nn.EmbeddingBag, nn.LSTM, nn.GRU, nn.RNN, nn.Flatten)


def classify(module: nn.Module) -> KindInfo:
    """Infer the kind of a leaf module (and its unit axis when the module fixes it)."""
    # Order matters: ReLU6 and Hardsigmoid are clipping before anything else.
    if isinstance(module, nn.ReLU6):
        return KindInfo(Kind.CLIPPING, bounds=(0.0, 6.0))
    if isinstance(module, nn.Hardsigmoid):
        return KindInfo(Kind.CLIPPING, bounds=(0.0, 1.0))
    if isinstance(module, nn.Hardtanh):
        return KindInfo(Kind.CLIPPING, bounds=(float(module.min_val), float(module.max_val)))
    if isinstance(module, _RELU):
        return KindInfo(Kind.RELU)
    if isinstance(module, _LEAKY):
        return KindInfo(Kind.LEAKY)
    if isinstance(module, _SMOOTH):
        return KindInfo(Kind.SMOOTH_GATED)
    if isinstance(module, nn.Sigmoid):
        return KindInfo(Kind.SIGMOID, bounds=(0.0, 1.0))
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return KindInfo(Kind.TANH, bounds=(-1.0, 1.0))
    if isinstance(module, (nn.Softmax, nn.Softmin)):
        return KindInfo(Kind.SOFTMAX, bounds=(0.0, 1.0), softmax_dim=module.dim)
    if isinstance(module, nn.LogSoftmax):
        return KindInfo(Kind.SOFTMAX, softmax_dim=module.dim, log_softmax=True)
    if isinstance(module, _CONV):
        return KindInfo(Kind.LINEAR, unit_axis=1)
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return KindInfo(Kind.LINEAR, unit_axis=-1)
    if isinstance(module, _CHANNEL_NORM):
        return KindInfo(Kind.NORM, unit_axis=1)
    if isinstance(module, _LAST_NORM):
        return KindInfo(Kind.NORM, unit_axis=-1)
    if isinstance(module, _LAST_AXIS_OTHER):
        return KindInfo(Kind.OTHER, unit_axis=-1)
    return _classify_by_name(type(module).__name__)


def _classify_by_name(name: str) -> KindInfo:
    """Fallback for classes torch does not define (Hugging Face activations, norms, Conv1D)."""
    lowered = name.lower()
    if "leaky" in lowered or ("elu" in lowered and "gelu" not in lowered and "relu" not in lowered):
        return KindInfo(Kind.LEAKY)
    if "relu" in lowered:
        return KindInfo(Kind.RELU)
    if any(key in lowered for key in ("gelu", "silu", "swish", "mish")):
        return KindInfo(Kind.SMOOTH_GATED)
    if lowered.endswith("norm"):
        return KindInfo(Kind.NORM, unit_axis=-1)
    if name == "Conv1D":  # transformers.pytorch_utils.Conv1D is a Linear with transposed weight
        return KindInfo(Kind.LINEAR, unit_axis=-1)
    return KindInfo(Kind.OTHER)


def with_kind(info: KindInfo, kind: Kind) -> KindInfo:
    """A user's kind override: keep the module's constants, default the bounds the kind implies."""
    bounds = info.bounds
    if kind is Kind.SIGMOID and bounds is None:
        bounds = (0.0, 1.0)
    if kind is Kind.TANH and bounds is None:
        bounds = (-1.0, 1.0)
    if kind is Kind.SOFTMAX and bounds is None and not info.log_softmax:
        bounds = (0.0, 1.0)
    return KindInfo(kind, bounds, info.softmax_dim, info.log_softmax, info.unit_axis)
