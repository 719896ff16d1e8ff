"""DenseNet-BC-100 for 32x32 inputs (growth 12, bottleneck 48, compression 0.5) and its k-variant,
as built by the reference's ``simple_densenet`` (baseline) and ``ksimple_densenet`` (Mendel 2022,
Section 4: "kDenseNet-BC L100 12ch").

The k-variants replace the bottleneck 1x1 convolution of every dense layer and the 1x1 convolution
of both transitions. The two reference builders differ in more than the grouping, so this module
builds one layout or the other:

* dense (the baseline, ``simple_densenet``): pre-activation layers, BN -> act -> 1x1 -> BN -> act
  -> 3x3, and transitions BN -> act -> 1x1 -> 2x2 average pool;
* grouped (``ksimple_densenet``): BN -> 1x1 (grouped, followed by ``activation``, no batch norm)
  -> BN -> 3x3 -> ReLU (the activation moved after the 3x3 convolution, and always ReLU), and
  transitions BN -> 1x1 (grouped, ``activation``) -> 2x2 average pool.

Both have a 3x3 stem convolution with bias (24 channels, no batch norm), end with BN -> ``activation``
-> global average pool -> linear, use batch-norm epsilon 1.001e-5, and ``activation=None`` means
ReLU dense and swish grouped (the builders' defaults). ``transition_interleave=True`` permutes the
channels before each transition as the reference's ``has_interleave_at_transition`` does
(``InterleaveChannels(growth)``), so that every group of the transition sees channels of many
dense layers. The notebooks' options per row are in :data:`gpconv.experiments.paper_numbers.NOTEBOOK_OPTIONS`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.block import Grouping, pointwise_conv
from ..layers import ActivationSpec, ChannelInterleave, make_activation, make_batch_norm
from .base import ImageClassifier
from .registry import register_model

EPS = 1.001e-5


class DenseLayer(nn.Module):
    """One bottleneck layer; its ``growth`` new channels are concatenated to its input."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int, grouping: Grouping, activation: ActivationSpec):
        super().__init__()
        if grouping.dense:
            self.body = nn.Sequential(
                make_batch_norm(in_channels, eps=EPS), make_activation(activation),
                nn.Conv2d(in_channels, bottleneck, 1, bias=False),
                make_batch_norm(bottleneck, eps=EPS), make_activation(activation),
                nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False))
        else:
            self.body = nn.Sequential(
                make_batch_norm(in_channels, eps=EPS),
                pointwise_conv(in_channels, bottleneck, grouping, activation=activation, batch_norm=False),
                make_batch_norm(bottleneck, eps=EPS),
                nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class Transition(nn.Sequential):
    """[channel interleave] -> BN -> 1x1 compression -> 2x2 average pool."""

    def __init__(self, in_channels: int, out_channels: int, grouping: Grouping, activation: ActivationSpec,
                 interleave_step: int = 0):
        layers = [ChannelInterleave(in_channels, interleave_step)] if interleave_step > 1 else []
        layers.append(make_batch_norm(in_channels, eps=EPS))
        if grouping.dense:
            layers += [make_activation(activation), nn.Conv2d(in_channels, out_channels, 1, bias=False)]
        else:
            layers.append(pointwise_conv(in_channels, out_channels, grouping, activation=activation, batch_norm=False))
        layers.append(nn.AvgPool2d(2, 2))
        super().__init__(*layers)


class DenseNet(ImageClassifier):
    """Three dense blocks with two transitions, for 32x32 inputs (the
    :class:`~gpconv.models.base.ImageClassifier` interface; ``features`` ends with BN -> activation)."""

    def __init__(self, num_classes: int, grouping: Grouping, activation: ActivationSpec, *, layers_per_block: int = 16,
                 growth: int = 12, bottleneck: int = 48, compression: float = 0.5, stem_channels: int = 24,
                 transition_interleave: bool = False):
        super().__init__()
        layers = [nn.Conv2d(3, stem_channels, 3, padding=1, bias=True)]
        channels = stem_channels
        for block in range(3):
            for _ in range(layers_per_block):
                layers.append(DenseLayer(channels, growth, bottleneck, grouping, activation))
                channels += growth
            if block < 2:
                compressed = int(channels * compression)
                layers.append(Transition(channels, compressed, grouping, activation,
                                         interleave_step=growth if transition_interleave else 0))
                channels = compressed
        layers += [make_batch_norm(channels, eps=EPS), make_activation(activation)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model("densenet_bc_100", max_skip_strides=0, min_input_size=4)
def densenet_bc_100(num_classes: int, grouping: Grouping, activation: ActivationSpec = None, skip_strides: int = 0,
                    transition_interleave: bool = False) -> DenseNet:
    """densenet_bc_100 (32x32 inputs): ``activation=None`` is ReLU dense, swish grouped;
    ``transition_interleave`` interleaves channels (step = growth) before each transition."""
    if activation is None:
        activation = "relu" if grouping.dense else "swish"
    return DenseNet(num_classes, grouping, activation, transition_interleave=transition_interleave)
