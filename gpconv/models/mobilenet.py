"""MobileNet (V1, any width) and its k-variant, as built by the reference's ``kMobileNet``
(Mendel 2022, Section 4: "kMobileNet").

The k-variants replace the pointwise convolution of each of the 13 depthwise-separable blocks; the
stem and the classifier stay dense. Differences between the two models the papers compare:

* the dense baseline is Keras' ``MobileNet``: ReLU6 everywhere;
* ``kMobileNet`` as the notebooks ran it (JP35B14/B18, k-neural-api branch development12; their
  ``model.summary()`` shows ``conv1_relu``/``conv_dw_N_relu`` ReLU layers and ``conv_pw_N``
  Activation layers) uses swish after the pointwise convolutions and keeps ReLU6 after the stem and
  the depthwise convolutions. ``activation`` is the pointwise one (``None``: ReLU6 dense, swish
  grouped); ``depthwise_activation`` (default ReLU6) is the stem's and the depthwise ones. The
  current reference code defaults both to swish (``conv1_activation``, ``d_separable_activation``);
  that would add 1,166,592 computations at 224x224 and not match the published figures;
* Keras pads strided convolutions by one pixel at the bottom/right only, then runs them 'valid';
* the classifier is a 1x1 convolution with bias on the pooled features (a linear layer here).

``width`` is the width multiplier (Howard et al. 2017, Section 3.3, "alpha"): every channel count,
the stem's included, times ``width``, rounded to a multiple of 8 (:func:`~gpconv.models.registry.scale_channels`,
as timm's MobileNet V1). Keras' ``alpha`` truncates instead (``int(channels * alpha)``); for the
published multipliers 0.25, 0.5, 0.75 and 1.0 both give the same channels.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..core.block import Grouping, pointwise_conv
from ..layers import ActivationSpec, make_activation, make_batch_norm
from .base import ImageClassifier
from .registry import register_model, scale_channels

# (pointwise output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS: Tuple[Tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _conv3x3(in_channels: int, out_channels: int, stride: int, groups: int, activation: ActivationSpec) -> nn.Sequential:
    """3x3 convolution (dense or depthwise) -> batch norm -> activation, Keras-padded when strided."""
    layers = [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(in_channels, out_channels, 3, stride, 0, groups=groups, bias=False)] \
        if stride > 1 else [nn.Conv2d(in_channels, out_channels, 3, 1, 1, groups=groups, bias=False)]
    return nn.Sequential(*layers, make_batch_norm(out_channels), make_activation(activation))


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 -> batch norm -> activation -> pointwise (dense or grouped) -> batch norm -> activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, grouping: Grouping,
                 activation: ActivationSpec, depthwise_activation: ActivationSpec):
        super().__init__()
        self.depthwise = _conv3x3(in_channels, in_channels, stride, in_channels, depthwise_activation)
        self.pointwise = pointwise_conv(in_channels, out_channels, grouping, activation=activation)


class MobileNet(ImageClassifier):
    """MobileNet V1 / kMobileNet (the :class:`~gpconv.models.base.ImageClassifier` interface). ``features`` ends with the last block; ``classifier`` is dropout +
    linear on the globally averaged features (logits)."""

    def __init__(self, num_classes: int, grouping: Grouping, activation: ActivationSpec,
                 depthwise_activation: ActivationSpec = "relu6", skip_strides: int = 0, dropout: float = 1e-3,
                 width: float = 1.0):
        super().__init__()
        stem = scale_channels(32, width)
        # The stem is padded bottom/right and run 'valid' even when its stride is skipped.
        stem_stride = 1 if skip_strides >= 1 else 2
        layers = [nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, stem, 3, stem_stride, 0, bias=False),
                                make_batch_norm(stem), make_activation(depthwise_activation))]
        in_channels, strided_seen = stem, 1
        for out_channels, stride in BLOCKS:
            out_channels = scale_channels(out_channels, width)
            if stride > 1:
                strided_seen += 1
                if strided_seen <= skip_strides:
                    stride = 1
            layers.append(DepthwiseSeparable(in_channels, out_channels, stride, grouping, activation,
                                             depthwise_activation))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, num_classes))
        self.num_features = in_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model("mobilenet", max_skip_strides=5, min_input_size=(32, 17, 9, 5, 3, 2))
def mobilenet(num_classes: int, grouping: Grouping, activation: ActivationSpec = None,
              skip_strides: int = 0, depthwise_activation: ActivationSpec = "relu6", width: float = 1.0) -> MobileNet:
    """mobilenet: MobileNet V1 (``width`` 1.0: the papers'). ``activation`` follows the pointwise convolutions
    (``None``: ReLU6 dense, swish grouped); ``depthwise_activation`` the stem and depthwise ones; ``width``
    multiplies every channel count (rounded to a multiple of 8)."""
    if activation is None:
        activation = "relu6" if grouping.dense else "swish"
    return MobileNet(num_classes, grouping, activation, depthwise_activation, skip_strides, width=width)
