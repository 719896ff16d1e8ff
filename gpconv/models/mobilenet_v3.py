"""MobileNet V3 Large and its k-variant, as built by the reference's ``kMobileNetV3Large``
(Mendel 2022, Section 4).

The k-variants replace every 1x1 convolution but the classifier: each block's expansion, the
squeeze-excitation reduce and expand, the projection, the last convolution (160 -> 960) and the
1x1 convolution on the pooled features (960 -> 1280, with bias, no batch norm). The dense baseline
is the reference's ``MobileNetV3Large`` (the Keras layout): same layers, all dense.

Reference details kept: hard swish is ``x * relu6(x + 3) / 6`` and the squeeze-excitation gate is
the hard sigmoid ``relu6(x + 3) / 6``; the squeeze width is ``_depth(expanded / 4)``; strided
depthwise convolutions are Keras-padded and run 'valid'; the first six blocks use ReLU.

Options the reference does not have:

* ``width``: torchvision's ``width_mult`` (Howard et al. 2019, Section 6.1.1, "multiplier"): the
  input, expanded and output channels of every block, the stem's and the 1280 head channels, each
  times ``width`` rounded to a multiple of 8 (``_make_divisible``;
  :func:`~gpconv.models.registry.scale_channels`); the squeeze width is then ``_depth(expanded / 4)``
  of the scaled block. Keras' ``alpha`` differs in two places: it keeps the stem at 16 channels and
  scales the 1280 head only when ``alpha > 1``.
* ``skip_strides=N``: the stem and the first N - 1 strided blocks run with stride 1, padded 'same'
  (``kernel // 2`` on each side), for small inputs (as for the other families).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..core.block import Grouping, pointwise_conv
from ..layers import ActivationSpec, KerasPad2d, SqueezeExcite, make_activation, make_batch_norm, make_divisible
from .base import ImageClassifier
from .registry import register_model, scale_channels


@dataclass(frozen=True)
class BlockConfig:
    """One inverted residual block: ``activation=None`` means the model's (hard swish) activation."""

    expansion: float
    out_channels: int
    kernel_size: int
    stride: int
    squeeze_excite: bool
    activation: Optional[str]


LARGE_BLOCKS: Tuple[BlockConfig, ...] = (
    BlockConfig(1, 16, 3, 1, False, "relu"),
    BlockConfig(4, 24, 3, 2, False, "relu"),
    BlockConfig(3, 24, 3, 1, False, "relu"),
    BlockConfig(3, 40, 5, 2, True, "relu"),
    BlockConfig(3, 40, 5, 1, True, "relu"),
    BlockConfig(3, 40, 5, 1, True, "relu"),
    BlockConfig(6, 80, 3, 2, False, None),
    BlockConfig(2.5, 80, 3, 1, False, None),
    BlockConfig(2.3, 80, 3, 1, False, None),
    BlockConfig(2.3, 80, 3, 1, False, None),
    BlockConfig(6, 112, 3, 1, True, None),
    BlockConfig(6, 112, 3, 1, True, None),
    BlockConfig(6, 160, 5, 2, True, None),
    BlockConfig(6, 160, 5, 1, True, None),
    BlockConfig(6, 160, 5, 1, True, None),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise -> squeeze-excite -> project (1x1), plus a residual when shapes allow.
    The first block has no expansion, as in the reference (``block_id == 0``)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, config: BlockConfig, *, stride: int,
                 grouping: Grouping, activation: ActivationSpec):
        super().__init__()
        layers = []
        if hidden != in_channels:
            layers.append(pointwise_conv(in_channels, hidden, grouping, activation=activation))
        k = config.kernel_size
        if stride > 1:
            layers += [KerasPad2d(k), nn.Conv2d(hidden, hidden, k, stride, 0, groups=hidden, bias=False)]
        else:
            layers.append(nn.Conv2d(hidden, hidden, k, 1, k // 2, groups=hidden, bias=False))
        layers += [make_batch_norm(hidden), make_activation(activation)]
        if config.squeeze_excite:
            squeezed = make_divisible(hidden * 0.25)
            layers.append(SqueezeExcite(
                pointwise_conv(hidden, squeezed, grouping, activation="relu", batch_norm=False, bias=True),
                pointwise_conv(squeezed, hidden, grouping, activation="hard_sigmoid", batch_norm=False, bias=True)))
        layers.append(pointwise_conv(hidden, out_channels, grouping, activation=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class MobileNetV3(ImageClassifier):
    """MobileNet V3 / kMobileNetV3 (the :class:`~gpconv.models.base.ImageClassifier` interface).
    ``features`` ends with the 960-channel 1x1 convolution; ``head`` is the 1x1 convolution on the
    pooled features; ``classifier`` is dropout + linear (logits). The head is not linear, so
    ``linear_head`` is False (no class activation maps)."""

    linear_head = False

    def __init__(self, num_classes: int, grouping: Grouping, activation: ActivationSpec = "hard_swish",
                 blocks: Tuple[BlockConfig, ...] = LARGE_BLOCKS, head_channels: int = 1280, dropout: float = 0.2,
                 width: float = 1.0, skip_strides: int = 0):
        super().__init__()
        stem = scale_channels(16, width)
        if skip_strides >= 1:
            layers = [nn.Conv2d(3, stem, 3, 1, 1, bias=False)]
        else:
            layers = [KerasPad2d(3), nn.Conv2d(3, stem, 3, 2, 0, bias=False)]
        layers += [make_batch_norm(stem), make_activation(activation)]
        base, channels, strided_seen = 16, stem, 1  # base: the channels at width 1 (the table's)
        for index, config in enumerate(blocks):
            block_activation = activation if config.activation is None else config.activation
            # the first block has no expansion (the reference's block_id == 0; torchvision's expanded == input)
            hidden = channels if index == 0 else scale_channels(make_divisible(base * config.expansion), width)
            stride = config.stride
            if stride > 1:
                strided_seen += 1
                if strided_seen <= skip_strides:
                    stride = 1
            out_channels = scale_channels(config.out_channels, width)
            layers.append(InvertedResidual(channels, hidden, out_channels, config, stride=stride, grouping=grouping,
                                           activation=block_activation))
            base, channels = config.out_channels, out_channels
        head_channels = scale_channels(head_channels, width)
        last = make_divisible(channels * 6)
        layers.append(pointwise_conv(channels, last, grouping, activation=activation))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = pointwise_conv(last, head_channels, grouping, activation=activation, batch_norm=False, bias=True)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_channels, num_classes))
        self.num_features = last

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.head(self.pool(features)), 1))


@register_model("mobilenet_v3_large", max_skip_strides=5)
def mobilenet_v3_large(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
                       skip_strides: int = 0, width: float = 1.0) -> MobileNetV3:
    """mobilenet_v3_large: ``activation=None`` is hard swish (the ReLU blocks stay ReLU); ``width``
    is torchvision's ``width_mult`` (1.0: the papers')."""
    return MobileNetV3(num_classes, grouping, "hard_swish" if activation is None else activation, width=width,
                       skip_strides=skip_strides)
