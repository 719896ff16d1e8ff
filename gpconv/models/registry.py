"""Model registry and ``create_model``."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn

from ..core.block import Grouping
from ..layers import ActivationSpec, check_activation, make_divisible
from ..core.plan import check_positive_int

__all__ = ["register_model", "create_model", "list_models", "min_input_size", "check_input_size",
           "CLASSIFIER_INITS", "init_classifier", "check_width", "scale_channels", "family_options"]

CLASSIFIER_INITS = ("family", "torch")


def check_width(width) -> float:
    """``width`` (a width multiplier) as a float; ValueError (one line) unless it is a finite number > 0."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a number > 0, got {width!r}")
    return float(width)


def scale_channels(channels: int, width: float) -> int:
    """``channels`` times the width multiplier ``width``, rounded to a multiple of 8 (never more than 10%
    down): torchvision's ``_make_divisible`` for MobileNet V2/V3 ``width_mult``, Keras' ``round_filters``
    for EfficientNet (:func:`~gpconv.layers.make_divisible`). ``width=1`` keeps a multiple of 8."""
    return make_divisible(channels * check_width(width), 8)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    max_skip_strides: int
    min_input_size: Union[int, Tuple[int, ...]] = 1  # an int, or one per skip_strides value

    @property
    def family_options(self) -> Tuple[str, ...]:
        """Keyword options of this family's builder beyond the common ones (e.g. DenseNet's
        ``transition_interleave``)."""
        common = {"num_classes", "grouping", "activation", "skip_strides"}
        return tuple(name for name in inspect.signature(self.builder).parameters if name not in common)


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, *, max_skip_strides: int = 0, min_input_size: Union[int, Tuple[int, ...]] = 1):
    """Decorator: register ``builder(num_classes, grouping, activation, skip_strides, **family_options)``
    as ``name``. ``activation=None`` must give the family's reference default. ``min_input_size``: the
    smallest square input the family runs on (an int, or a tuple indexed by ``skip_strides``)."""

    def decorate(builder):
        _REGISTRY[name] = ModelEntry(name, builder, max_skip_strides, min_input_size)
        return builder

    return decorate


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def family_options(arch: str) -> Tuple[str, ...]:
    """The keywords of :func:`create_model` only ``arch``'s family has (``width``, ``transition_interleave`` ...)."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; expected one of: {', '.join(list_models())}")
    return _REGISTRY[arch].family_options


def min_input_size(arch: str, skip_strides: int = 0) -> int:
    """The smallest square input (pixels) ``arch`` runs on with ``skip_strides``."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; expected one of: {', '.join(list_models())}")
    minimum = _REGISTRY[arch].min_input_size
    if isinstance(minimum, int):
        return minimum
    return minimum[min(max(int(skip_strides), 0), len(minimum) - 1)]


def check_input_size(arch: str, input_size, skip_strides: int = 0) -> None:
    """ValueError (one line) when ``input_size`` (int or ``(H, W)``) is below ``arch``'s minimum."""
    sizes = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)[-2:]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in sizes):
        raise TypeError(f"input size must be an int, got {input_size!r}")
    minimum = min_input_size(arch, skip_strides)
    if min(sizes) < minimum:
        raise ValueError(f"input size {min(sizes)} is too small for {arch} with skip_strides {skip_strides}: "
                         f"it needs at least {minimum}x{minimum} pixels")


def create_model(arch: str, num_classes: int = 10, *, channels_per_group: Optional[int] = None, version: int = 2,
                 l_layer: bool = True, activation: ActivationSpec = None, skip_strides: int = 0,
                 **family_options) -> nn.Module:
    """Build a registered architecture.

    ``channels_per_group=None`` gives the dense baseline; an int gives the k-variant whose pointwise
    convolutions are :class:`~gpconv.core.block.GroupedPointwiseConv2d` (``version``, ``l_layer``).
    ``skip_strides=N`` runs the first N strided layers (the stem first) with stride 1, for small
    inputs: ``skip_strides=3`` is the papers' 32x32 setting (the reference's ``skip_stride_cnt=3``).
    ``activation=None`` uses the reference's choice for the family (swish for EfficientNet; see each
    family's builder). ``family_options`` are keywords only some families have, e.g.
    ``transition_interleave`` for ``densenet_bc_100``.
    """
    if not isinstance(arch, str) or arch not in _REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; expected one of: {', '.join(list_models())}")
    check_positive_int("num_classes", num_classes)
    check_activation(activation)
    entry = _REGISTRY[arch]
    if isinstance(skip_strides, bool) or not isinstance(skip_strides, int):
        raise TypeError(f"skip_strides must be an int, got {skip_strides!r}")
    if not 0 <= skip_strides <= entry.max_skip_strides:
        raise ValueError(f"skip_strides must be between 0 and {entry.max_skip_strides} for {arch}, got {skip_strides}")
    unknown = sorted(set(family_options) - set(entry.family_options))
    if unknown:
        allowed = ", ".join(entry.family_options) or "none"
        raise TypeError(f"unknown option {unknown[0]!r} for {arch}; its extra options are: {allowed}")
    grouping = Grouping(channels_per_group, version, l_layer)
    return entry.builder(num_classes, grouping, activation=activation, skip_strides=skip_strides, **family_options)


def init_classifier(model: nn.Module, rule: str = "family") -> nn.Module:
    """Re-initialise the linear layers of ``model.classifier`` by ``rule`` (in place; returns ``model``).

    ``"family"`` keeps what the family's builder did (for EfficientNet Keras' rule, uniform
    ``±1/sqrt(classes)``: ±0.32 with 10 classes, so a fresh model's logits reach ~8). ``"torch"`` is
    PyTorch's ``nn.Linear`` default, uniform ``±1/sqrt(features)`` (±0.028 for 1280 features): the
    study in docs/training.md found it lets a small-data run learn from the first steps.
    """
    if rule not in CLASSIFIER_INITS:
        raise ValueError(f"classifier_init must be one of {', '.join(CLASSIFIER_INITS)}, got {rule!r}")
    if rule == "torch":
        for module in model.classifier.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    return model
