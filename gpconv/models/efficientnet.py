"""EfficientNet B0-B7 and their k-variants (kEffNet), as built by the reference's ``kEfficientNet``.

The k-variants replace the same 1x1 convolutions the reference replaces: the expansion, the
squeeze-excitation reduce and expand, the projection, and the top convolution. Differences from
torchvision's EfficientNet that the reference has (and that its published counts include):

* the k-variants have no activation after the top convolution (the reference's ``kEfficientNet``
  builds ``top_conv`` as conv -> batch norm only), while the dense baseline the papers report is
  Keras' ``EfficientNetB0``, which has one (``top_activation=None`` picks accordingly);
* Keras padding: strided convolutions and the stem pad asymmetrically and then run 'valid'; the
  stem does so even with its stride skipped, so a 32x32 input gives 31x31 maps;
* ``skip_strides`` removes the stride of the stem and of the first strided stages (32x32 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
from torch import nn

from ..core.block import GroupedPointwiseConv2d, Grouping, pointwise_conv
from ..layers import ActivationSpec, KerasPad2d, SqueezeExcite, StochasticDepth, make_activation, make_divisible
from .base import ImageClassifier
from .registry import check_width, register_model


@dataclass(frozen=True)
class StageConfig:
    """One stage of MBConv blocks (one row of the EfficientNet-B0 table)."""

    kernel_size: int
    repeats: int
    in_channels: int
    out_channels: int
    expand_ratio: int
    stride: int
    se_ratio: float = 0.25


B0_STAGES: Tuple[StageConfig, ...] = (
    StageConfig(3, 1, 32, 16, 1, 1),
    StageConfig(3, 2, 16, 24, 6, 2),
    StageConfig(5, 2, 24, 40, 6, 2),
    StageConfig(3, 3, 40, 80, 6, 2),
    StageConfig(5, 3, 80, 112, 6, 1),
    StageConfig(5, 4, 112, 192, 6, 2),
    StageConfig(3, 1, 192, 320, 6, 1),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    """Scaling of one EfficientNet variant."""

    width: float
    depth: float
    dropout: float
    stages: Tuple[StageConfig, ...] = B0_STAGES
    stem_channels: int = 32
    head_channels: int = 1280
    drop_connect: float = 0.2
    divisor: int = 8

    def channels(self, channels: int) -> int:
        """Width scaling rounded to a multiple of ``divisor`` (never more than 10% down)."""
        return make_divisible(channels * self.width, self.divisor)

    def repeats(self, repeats: int) -> int:
        return int(math.ceil(self.depth * repeats))


CONFIGS = {
    "efficientnet_b0": EfficientNetConfig(1.0, 1.0, 0.2),
    "efficientnet_b1": EfficientNetConfig(1.0, 1.1, 0.2),
    "efficientnet_b2": EfficientNetConfig(1.1, 1.2, 0.3),
    "efficientnet_b3": EfficientNetConfig(1.2, 1.4, 0.3),
    "efficientnet_b4": EfficientNetConfig(1.4, 1.8, 0.4),
    "efficientnet_b5": EfficientNetConfig(1.6, 2.2, 0.4),
    "efficientnet_b6": EfficientNetConfig(1.8, 2.6, 0.5),
    "efficientnet_b7": EfficientNetConfig(2.0, 3.1, 0.5),
}


class MBConv(nn.Module):
    """Mobile inverted bottleneck: expand -> depthwise -> squeeze-excite -> project (+ residual)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, stride: int, expand_ratio: int,
                 se_ratio: float, grouping: Grouping, activation: ActivationSpec, drop_rate: float):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers = []
        if expand_ratio != 1:
            layers.append(pointwise_conv(in_channels, hidden, grouping, activation=activation))
        if stride > 1:
            layers += [KerasPad2d(kernel_size), nn.Conv2d(hidden, hidden, kernel_size, stride, 0, groups=hidden,
                                                          bias=False)]
        else:
            layers.append(nn.Conv2d(hidden, hidden, kernel_size, 1, kernel_size // 2, groups=hidden, bias=False))
        layers += [nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01), make_activation(activation)]
        if 0 < se_ratio <= 1:
            squeezed = max(1, int(in_channels * se_ratio))
            layers.append(SqueezeExcite(
                pointwise_conv(hidden, squeezed, grouping, activation=activation, batch_norm=False, bias=True),
                pointwise_conv(squeezed, hidden, grouping, activation="sigmoid", batch_norm=False, bias=True)))
        layers.append(pointwise_conv(hidden, out_channels, grouping, activation=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop = StochasticDepth(drop_rate) if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return self.drop(out) + x if self.residual else out


class EfficientNet(ImageClassifier):
    """EfficientNet / kEffNet (the :class:`~gpconv.models.base.ImageClassifier` interface). ``features``
    ends with the top 1x1 convolution; ``classifier`` is dropout + linear on the globally averaged
    features (logits; no softmax)."""

    def __init__(self, config: EfficientNetConfig, num_classes: int, grouping: Grouping,
                 activation: ActivationSpec = "swish", skip_strides: int = 0,
                 top_activation: Optional[bool] = None):
        super().__init__()
        stem = config.channels(config.stem_channels)
        layers = [KerasPad2d(3), nn.Conv2d(3, stem, 3, 1 if skip_strides >= 1 else 2, 0, bias=False),
                  nn.BatchNorm2d(stem, eps=1e-3, momentum=0.01), make_activation(activation)]
        total_blocks = sum(config.repeats(stage.repeats) for stage in config.stages)
        block_index = 0
        strided_seen = 1  # the stem is the first strided layer
        for stage in config.stages:
            in_channels, out_channels = config.channels(stage.in_channels), config.channels(stage.out_channels)
            stride = stage.stride
            if stride > 1:
                strided_seen += 1
                if strided_seen <= skip_strides:
                    stride = 1
            for repeat in range(config.repeats(stage.repeats)):
                layers.append(MBConv(
                    in_channels if repeat == 0 else out_channels, out_channels, kernel_size=stage.kernel_size,
                    stride=stride if repeat == 0 else 1, expand_ratio=stage.expand_ratio, se_ratio=stage.se_ratio,
                    grouping=grouping, activation=activation,
                    drop_rate=config.drop_connect * block_index / total_blocks))
                block_index += 1
        head = config.channels(config.head_channels)
        if top_activation is None:
            top_activation = grouping.dense
        layers.append(pointwise_conv(out_channels, head, grouping, activation=activation if top_activation else None))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(head, num_classes))
        self.num_features = head
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _init_weights(model: nn.Module) -> None:
    """Keras' EfficientNet initialisers: convolutions ``VarianceScaling(2.0, 'fan_out', normal)``, the
    classifier ``VarianceScaling(1/3, 'fan_out', uniform)`` (bound ``1/sqrt(classes)``).

    Keras computes a kernel's fan-out as ``kernel_h * kernel_w * output channels per input
    channel``: for a depthwise convolution that is ``k * k`` (depth multiplier 1), not PyTorch's
    ``channels * k * k``, so depthwise weights are initialised ``sqrt(channels)`` times larger than
    ``kaiming_normal_(mode='fan_out')`` would (docs/training.md).

    The k-variants' pointwise convolutions (K and L of every :class:`GroupedPointwiseConv2d`) are
    Glorot-uniform, as the reference's ``kPointwiseConv2D`` builds them (its ``conv2d_bn`` keeps
    Keras' default ``glorot_uniform``; fan-in = channels per group, fan-out = the path's filters).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            fan_out = module.out_channels // (module.groups if depthwise else 1) * module.weight[0, 0].numel()
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)
    for block in model.modules():
        if isinstance(block, GroupedPointwiseConv2d):
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.xavier_uniform_(conv.weight)


def scaled_config(arch: str, width: float = 1.0) -> EfficientNetConfig:
    """``CONFIGS[arch]`` with its ``width_coefficient`` multiplied by ``width`` (Tan & Le 2019, Eq. 3:
    every channel count, stem and head included, times the coefficient, rounded by Keras'
    ``round_filters``: :func:`~gpconv.layers.make_divisible` to a multiple of 8). ``width=0.5`` on B0
    is a B0 with about half the channels; the depth is unchanged."""
    config = CONFIGS[arch]
    return replace(config, width=config.width * check_width(width))


def _efficientnet(arch: str, num_classes: int, grouping: Grouping, activation: ActivationSpec,
                  skip_strides: int, width: float = 1.0) -> EfficientNet:
    return EfficientNet(scaled_config(arch, width), num_classes, grouping, "swish" if activation is None else activation,
                        skip_strides)


@register_model("efficientnet_b0", max_skip_strides=5)
def efficientnet_b0(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B0 / kEffNet-B0 (scaling: ``CONFIGS["efficientnet_b0"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b0", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b1", max_skip_strides=5)
def efficientnet_b1(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B1 / kEffNet-B1 (scaling: ``CONFIGS["efficientnet_b1"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b1", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b2", max_skip_strides=5)
def efficientnet_b2(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B2 / kEffNet-B2 (scaling: ``CONFIGS["efficientnet_b2"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b2", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b3", max_skip_strides=5)
def efficientnet_b3(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B3 / kEffNet-B3 (scaling: ``CONFIGS["efficientnet_b3"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b3", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b4", max_skip_strides=5)
def efficientnet_b4(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B4 / kEffNet-B4 (scaling: ``CONFIGS["efficientnet_b4"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b4", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b5", max_skip_strides=5)
def efficientnet_b5(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B5 / kEffNet-B5 (scaling: ``CONFIGS["efficientnet_b5"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b5", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b6", max_skip_strides=5)
def efficientnet_b6(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B6 / kEffNet-B6 (scaling: ``CONFIGS["efficientnet_b6"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b6", num_classes, grouping, activation, skip_strides, width)


@register_model("efficientnet_b7", max_skip_strides=5)
def efficientnet_b7(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                    skip_strides: int = 0, width: float = 1.0) -> EfficientNet:
    """EfficientNet-B7 / kEffNet-B7 (scaling: ``CONFIGS["efficientnet_b7"]``), the reference's kEfficientNet layout.
    ``width``: a multiplier of its ``width_coefficient`` (:func:`scaled_config`)."""
    return _efficientnet("efficientnet_b7", num_classes, grouping, activation, skip_strides, width)
