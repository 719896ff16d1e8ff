"""What a training run is made of: :class:`ModelConfig` (the model), :class:`TrainConfig` (the
papers' protocol as defaults), and the checks of their numeric options that ``gpconv train``,
``gpconv sweep`` and sweep YAML files share (:func:`positive_int`, :func:`non_negative_int`,
:func:`positive_float`; argparse types that raise :class:`argparse.ArgumentTypeError`)."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import List, Optional

from torch import nn

from ..models import CLASSIFIER_INITS, check_input_size, create_model, init_classifier

__all__ = ["ModelConfig", "TrainConfig", "field_default", "positive_int", "non_negative_int", "positive_float"]


def _number(text: str, kind, minimum, description: str, strict: bool = False):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (argparse type; ArgumentTypeError otherwise)."""
    return _number(text, int, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type)."""
    return _number(text, int, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    return _number(text, float, 0, "a number > 0", strict=True)


@dataclass
class ModelConfig:
    """Everything :func:`~gpconv.models.create_model` needs to rebuild a trained model."""

    arch: str
    num_classes: int = 10
    channels_per_group: Optional[int] = None
    version: int = 2
    l_layer: bool = True
    activation: Optional[str] = None  # None: the family's default, as gpconv sweep and create_model
    skip_strides: int = 0
    image_size: int = 32
    classifier_init: str = "family"

    def __post_init__(self):
        if self.classifier_init not in CLASSIFIER_INITS:
            raise ValueError(f"classifier_init must be one of {', '.join(CLASSIFIER_INITS)}, got "
                             f"{self.classifier_init!r}")

    def build(self) -> nn.Module:
        """The model; ValueError (one line) on a bad combination or an input size too small for the arch."""
        check_input_size(self.arch, self.image_size, self.skip_strides)
        model = create_model(self.arch, self.num_classes, channels_per_group=self.channels_per_group,
                             version=self.version, l_layer=self.l_layer, activation=self.activation,
                             skip_strides=self.skip_strides)
        return init_classifier(model, self.classifier_init)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainConfig:
    """A training run. Defaults are the papers' protocol."""

    dataset: str
    output: str
    data_dir: Optional[str] = None
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    lr_cycle: int = 25
    max_train_batches: Optional[int] = None
    monitor: str = "val_accuracy"
    hflip_tta: bool = False
    val_flips: bool = False
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    precise_bn_batches: int = 0
    eval_batch_size: int = 64
    synthetic_size: List[int] = field(default_factory=lambda: [2000, 500])

    def __post_init__(self):
        if self.monitor not in ("val_accuracy", "val_loss"):
            raise ValueError(f"monitor must be val_accuracy or val_loss, got {self.monitor!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "lr_cycle"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_batches is not None and self.max_train_batches < 1:
            raise ValueError(f"max_train_batches must be >= 1, got {self.max_train_batches}")


def field_default(item: Field):
    """The default of a dataclass field (its factory's value), None for a required field."""
    if item.default is not MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not MISSING else None
