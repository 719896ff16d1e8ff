"""What a training run is made of: :class:`ModelConfig` (the model), :class:`TrainConfig` (the
papers' protocol as defaults), and the checks of their numeric options that ``gpconv train``,
``gpconv sweep`` and sweep YAML files share (:func:`positive_int`, :func:`non_negative_int`,
:func:`positive_float`; argparse types that raise :class:`argparse.ArgumentTypeError`)."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Callable, List, Optional

from torch import nn

from ..core.convert import apply_conversion
from ..models import CLASSIFIER_INITS, check_input_size, check_width, create_model, family_options, init_classifier

__all__ = ["ModelConfig", "TrainConfig", "ShrinkConfig", "SHRINK_INITS", "SHRINK_LR", "EARLIER_SHRINK_SETTINGS",
           "OPTIMIZERS", "field_default", "positive_int", "non_negative_int", "positive_float", "int_at_least",
           "check_fields"]


SCHEDULES = ("cyclical", "cosine")
# "rmsprop": the papers' (Keras' defaults); "adamw": bias-corrected from the first step (gpconv shrink's)
OPTIMIZERS = ("rmsprop", "adamw")


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


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (ArgumentTypeError otherwise)."""
    return lambda text: _number(text, int, minimum, f"an integer >= {minimum}")


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
    # width multiplier (EfficientNet's width_coefficient on top of the family's, MobileNet's alpha,
    # MobileNet V3's width_mult); 1.0 is the papers' model, and the only width other families have
    width: float = 1.0
    # a model gpconv.convert made from the family's dense model (gpconv shrink): its conversion record
    # (gpconv.core.convert.conversion_record), re-applied by build(); None for the family's own models
    conversion: Optional[dict] = None

    def __post_init__(self):
        for name, minimum in (("num_classes", 1), ("image_size", 1), ("skip_strides", 0), ("channels_per_group", 1)):
            value = getattr(self, name)
            if value is not None and isinstance(value, int) and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if self.classifier_init not in CLASSIFIER_INITS:
            raise ValueError(f"classifier_init must be one of {', '.join(CLASSIFIER_INITS)}, got "
                             f"{self.classifier_init!r}")
        self.width = check_width(self.width)
        if self.width != 1.0 and "width" not in family_options(self.arch):
            raise ValueError(f"width: {self.arch} has no width multiplier (only 1 is allowed), got {self.width:g}")

    def build(self) -> nn.Module:
        """The model; ValueError (one line) on a bad combination or an input size too small for the arch."""
        check_input_size(self.arch, self.image_size, self.skip_strides)
        model = create_model(self.arch, self.num_classes, channels_per_group=self.channels_per_group,
                             version=self.version, l_layer=self.l_layer, activation=self.activation,
                             skip_strides=self.skip_strides, **self.family_options())
        model = init_classifier(model, self.classifier_init)
        return model if self.conversion is None else apply_conversion(model, self.conversion)

    def family_options(self) -> dict:
        """The :func:`~gpconv.models.create_model` keywords only some families have: ``width`` when it is
        not 1 (a family without a width multiplier then refuses it in one line)."""
        return {} if self.width == 1.0 else {"width": self.width}

    @classmethod
    def from_dict(cls, values: dict, where: str = "model_config") -> "ModelConfig":
        """The config saved as ``values`` (unknown keys ignored), each field's type checked
        (:func:`check_fields`; ``where`` names the file and key in the one-line ValueError)."""
        names = {f.name for f in fields(cls)}
        check_fields(cls, values, where)
        if not isinstance(values.get("arch"), str):
            raise ValueError(f"{where} has no arch")
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
    # "cyclical": the papers' cycle (cyclical_lr); "cosine": lr decays from lr to 0 over the epochs
    # (fine-tuning, gpconv shrink)
    schedule: str = "cyclical"
    optimizer: str = "rmsprop"  # one of OPTIMIZERS
    # knowledge distillation (Hinton et al. 2015): a teacher checkpoint whose softened outputs
    # (temperature) are learnt with weight distillation_weight, the labels with the rest
    teacher: Optional[str] = None
    temperature: float = 4.0
    distillation_weight: float = 0.9
    shrink: Optional[dict] = None  # gpconv shrink's settings (gpconv.experiments.shrink.ShrinkConfig.settings)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (0 <= self.distillation_weight <= 1) or not self.temperature > 0:
            raise ValueError("distillation_weight must be in [0, 1] and temperature > 0")
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


def _type_check(annotation: str):
    """``(test(value) -> bool, description)`` for a field annotation of :class:`ModelConfig` or
    :class:`TrainConfig` (``int``, ``float``, ``bool``, ``str``, ``dict``, ``List[int]``, ``Optional[...]``)."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        test, description = _type_check(annotation[len("Optional["):-1])
        return (lambda value: value is None or test(value)), description + " or null"
    simple = {"int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              "bool": (lambda v: isinstance(v, bool), "true or false"),
              "str": (lambda v: isinstance(v, str), "a string"),
              "dict": (lambda v: isinstance(v, dict), "a mapping")}
    if annotation in simple:
        return simple[annotation]
    if annotation == "List[int]":
        item = simple["int"][0]
        return (lambda v: isinstance(v, list) and all(item(x) for x in v)), "a list of integers"
    return (lambda value: True), "anything"


def check_fields(kind, values, where: str) -> None:
    """ValueError (one line, naming ``where`` and the field) unless ``values`` is a mapping whose
    fields of the dataclass ``kind`` (:class:`ModelConfig`, :class:`TrainConfig`) have their types:
    the one check of a saved config (``config.json``, a checkpoint's ``model_config`` and
    ``train_config``). Fields ``values`` lacks are left to the dataclass defaults."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} is not a mapping (got {type(values).__name__})")
    for item in fields(kind):
        if item.name in values:
            test, description = _type_check(str(item.type))
            if not test(values[item.name]):
                raise ValueError(f"{where}: field {item.name} is {values[item.name]!r}, expected {description}")


SHRINK_INITS = ("fit", "random")  # gpconv shrink --init: blocks fitted to the dense layers, or plain convert
# shrink settings recorded before the setting existed, with the value those runs had (block reconstruction came later)
EARLIER_SHRINK_SETTINGS = {"block_steps": 0}
# gpconv shrink's fine-tuning learning rate when none is given: the one with the best validation accuracy after 6
# epochs for one channels per group (fitted or random blocks) and for a budget (docs/results.md, the learning-rate
# check)
SHRINK_LR = {"channels_per_group": 3e-3, "budget": 1e-3}


@dataclass
class ShrinkConfig:
    """A shrink run. ``channels_per_group`` (uniform) or ``budget`` (fraction of the teacher's trainable
    parameters, per-layer choice) -- exactly one. ``init``: ``"fit"`` (weight transfer) or ``"random"``
    (plain ``convert``: the control). ``block_steps``: Adam steps of block reconstruction after the fit
    (:func:`gpconv.core.reconstruction.reconstruct_blocks`; ``init="fit"`` only). ``lr``: the start of the
    fine-tuning's cosine schedule; None: :data:`SHRINK_LR` for the mode (one channels per group, or a budget).
    ``start_from``: the folder of an earlier shrink of the same teacher with
    the same settings but its epochs (e.g. a 0-epoch run), whose fitted model is the start: no conversion
    or fit again. Defaults measured in docs/results.md ("Shrinking a trained model")."""

    checkpoint: str
    output: str
    channels_per_group: Optional[int] = None
    budget: Optional[float] = None
    version: int = 2
    l_layer: bool = True
    init: str = "fit"
    epochs: int = 6
    lr: Optional[float] = None
    optimizer: str = "adamw"
    augment: bool = False
    temperature: float = 4.0
    distillation_weight: float = 0.9
    calibration_images: int = 1024
    fit_steps: int = 100
    block_steps: int = 100
    seed: int = 0
    start_from: Optional[str] = None

    def check(self) -> None:
        """One-line ``ValueError`` for settings that cannot make a run."""
        if (self.channels_per_group is None) == (self.budget is None):
            raise ValueError("give exactly one of --channels-per-group and --budget")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"--budget must be a fraction of the parameters in (0, 1], got {self.budget}")
        if self.init not in SHRINK_INITS:
            raise ValueError(f"init must be one of {', '.join(SHRINK_INITS)}, got {self.init!r}")
        if self.epochs < 0 or self.calibration_images < 1 or self.fit_steps < 0 or self.block_steps < 0:
            raise ValueError("epochs, fit steps and block steps must be >= 0, calibration images >= 1")

    @property
    def settings(self) -> dict:
        """What ``config.json`` records under ``train.shrink``."""
        keys = ("channels_per_group", "budget", "version", "l_layer", "init", "epochs", "calibration_images",
                "fit_steps", "block_steps", "start_from")
        settings = {key: getattr(self, key) for key in keys}
        if self.init != "fit":  # random blocks are not reconstructed either: the control is plain convert
            settings["block_steps"] = 0
        return settings

    @property
    def learning_rate(self) -> float:
        """``lr``, or the measured default for the mode (:data:`SHRINK_LR`)."""
        if self.lr is not None:
            return self.lr
        return SHRINK_LR["budget" if self.budget is not None else "channels_per_group"]
