"""Inception V3 and its k-variant, as built by the reference's ``InceptionV3`` (baseline, the Keras
layout) and ``two_path_inception_v3`` with its two-path options off (Mendel 2022, Section 4:
"kInceptionV3"; notebooks JP34B08 and JP34B12).

Every convolution is ``conv2d_bn``: convolution without bias -> batch norm without a learned scale
(Keras ``scale=False``) -> ReLU. The k-variants replace the stem's 64 -> 80 1x1 convolution and the
1x1 convolutions of the mixed blocks, except three that the reference builds without passing its
``kType`` (so they stay dense): the first 1x1 of the double-3x3 branch in mixed 0 and mixed 2, and
the 1x1 after the average pool in mixed 2. ``reference_dense_quirks=False`` groups those too.
Average pools ('same', 3x3, stride 1) do not count the padding, as in TensorFlow.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

from ..core.block import Grouping, pointwise_conv
from ..layers import ActivationSpec, ConvBnAct
from .base import ImageClassifier
from .registry import register_model

Kernel = Union[int, Tuple[int, int]]

# (mixed block, branch) pointwise convolutions the reference leaves dense in its k-variant.
REFERENCE_DENSE_POINTWISE = {("mixed0", "double3x3"), ("mixed2", "double3x3"), ("mixed2", "pool")}


def conv_bn(in_channels: int, out_channels: int, kernel: Kernel, activation: ActivationSpec, *, stride: int = 1,
            valid: bool = False) -> ConvBnAct:
    """The reference's ``conv2d_bn``: 'same' padding unless ``valid``."""
    return ConvBnAct(in_channels, out_channels, kernel, stride=stride, activation=activation, batch_norm_scale=False,
                     padding=0 if valid else None)


class Branches(nn.Module):
    """Runs each branch on the same input and concatenates the outputs along channels."""

    def __init__(self, branches: Sequence[nn.Module], names: Sequence[str]):
        super().__init__()
        self.branches = nn.ModuleDict(zip(names, branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches.values()], dim=1)


class SplitPair(nn.Module):
    """Two convolutions (1x3 and 3x1) on the same input, concatenated (mixed 9 and 10)."""

    def __init__(self, channels: int, activation: ActivationSpec):
        super().__init__()
        self.conv_1x3 = conv_bn(channels, channels, (1, 3), activation)
        self.conv_3x1 = conv_bn(channels, channels, (3, 1), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv_1x3(x), self.conv_3x1(x)], dim=1)


class InceptionV3(ImageClassifier):
    """Inception V3 / kInceptionV3 (logits; 299x299 or 224x224 inputs; the
    :class:`~gpconv.models.base.ImageClassifier` interface, features = ``mixed(stem(x))``)."""

    def __init__(self, num_classes: int, grouping: Grouping, activation: ActivationSpec = "relu",
                 reference_dense_quirks: bool = True):
        super().__init__()
        self.grouping, self.activation, self.quirks = grouping, activation, reference_dense_quirks
        act = activation
        self.stem = nn.Sequential(
            conv_bn(3, 32, 3, act, stride=2, valid=True), conv_bn(32, 32, 3, act, valid=True), conv_bn(32, 64, 3, act),
            nn.MaxPool2d(3, 2), self._pointwise(64, 80), conv_bn(80, 192, 3, act, valid=True), nn.MaxPool2d(3, 2))
        mixed = [self._block_a("mixed0", 192, 32), self._block_a("mixed1", 256, 64), self._block_a("mixed2", 288, 64),
                 self._block_b()]
        mixed += [self._block_c(f"mixed{index}", c7) for index, c7 in zip(range(4, 8), (128, 160, 160, 192))]
        mixed += [self._block_d(), self._block_e("mixed9", 1280), self._block_e("mixed10", 2048)]
        self.mixed = nn.Sequential(*mixed)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2048, num_classes)
        self.num_features = 2048

    def _pointwise(self, in_channels: int, out_channels: int, block: str = "", branch: str = "") -> nn.Module:
        grouping = self.grouping
        if self.quirks and (block, branch) in REFERENCE_DENSE_POINTWISE:
            grouping = Grouping()
        return pointwise_conv(in_channels, out_channels, grouping, activation=self.activation, batch_norm_scale=False)

    def _avg_pool_branch(self, block: str, in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                             self._pointwise(in_channels, out_channels, block, "pool"))

    def _block_a(self, name: str, in_channels: int, pool_channels: int) -> Branches:
        pw, act = self._pointwise, self.activation
        return Branches([
            pw(in_channels, 64, name, "1x1"),
            nn.Sequential(pw(in_channels, 48, name, "5x5"), conv_bn(48, 64, 5, act)),
            nn.Sequential(pw(in_channels, 64, name, "double3x3"), conv_bn(64, 96, 3, act), conv_bn(96, 96, 3, act)),
            self._avg_pool_branch(name, in_channels, pool_channels),
        ], ("1x1", "5x5", "double3x3", "pool"))

    def _block_b(self) -> Branches:
        pw, act = self._pointwise, self.activation
        return Branches([
            conv_bn(288, 384, 3, act, stride=2, valid=True),
            nn.Sequential(pw(288, 64, "mixed3", "double3x3"), conv_bn(64, 96, 3, act),
                          conv_bn(96, 96, 3, act, stride=2, valid=True)),
            nn.MaxPool2d(3, 2),
        ], ("3x3", "double3x3", "pool"))

    def _block_c(self, name: str, c7: int) -> Branches:
        pw, act = self._pointwise, self.activation
        return Branches([
            pw(768, 192, name, "1x1"),
            nn.Sequential(pw(768, c7, name, "7x7"), conv_bn(c7, c7, (1, 7), act), conv_bn(c7, 192, (7, 1), act)),
            nn.Sequential(pw(768, c7, name, "double7x7"), conv_bn(c7, c7, (7, 1), act), conv_bn(c7, c7, (1, 7), act),
                          conv_bn(c7, c7, (7, 1), act), conv_bn(c7, 192, (1, 7), act)),
            self._avg_pool_branch(name, 768, 192),
        ], ("1x1", "7x7", "double7x7", "pool"))

    def _block_d(self) -> Branches:
        pw, act = self._pointwise, self.activation
        return Branches([
            nn.Sequential(pw(768, 192, "mixed8", "3x3"), conv_bn(192, 320, 3, act, stride=2, valid=True)),
            nn.Sequential(pw(768, 192, "mixed8", "7x7x3"), conv_bn(192, 192, (1, 7), act),
                          conv_bn(192, 192, (7, 1), act), conv_bn(192, 192, 3, act, stride=2, valid=True)),
            nn.MaxPool2d(3, 2),
        ], ("3x3", "7x7x3", "pool"))

    def _block_e(self, name: str, in_channels: int) -> Branches:
        pw, act = self._pointwise, self.activation
        return Branches([
            pw(in_channels, 320, name, "1x1"),
            nn.Sequential(pw(in_channels, 384, name, "3x3"), SplitPair(384, act)),
            nn.Sequential(pw(in_channels, 448, name, "double3x3"), conv_bn(448, 384, 3, act), SplitPair(384, act)),
            self._avg_pool_branch(name, in_channels, 192),
        ], ("1x1", "3x3", "double3x3", "pool"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixed(self.stem(x))


@register_model("inception_v3", max_skip_strides=0, min_input_size=75)
def inception_v3(num_classes: int, grouping: Grouping, activation: ActivationSpec = None, skip_strides: int = 0,
                 reference_dense_quirks: bool = True) -> InceptionV3:
    """inception_v3: ``activation=None`` is ReLU; ``reference_dense_quirks`` keeps the three 1x1
    convolutions the reference leaves dense in its k-variant dense."""
    return InceptionV3(num_classes, grouping, "relu" if activation is None else activation, reference_dense_quirks)
