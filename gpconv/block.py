"""The grouped pointwise convolution block: executes a :class:`~gpconv.plan.PointwisePlan`.

This is the straightforward execution (one grouped convolution per path, explicit channel gathers,
concatenation, interleaving by index): the reference that faster executions are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .layers import ActivationSpec, ConvBnAct, check_activation, make_activation, make_batch_norm
from .plan import ConvPath, LayerPlan, PointwisePlan, check_positive_int, make_plan

__all__ = ["GroupedPointwiseConv2d", "GroupedConvPath", "GroupedConvLayer", "Grouping", "pointwise_conv"]


def _index_buffer(index) -> Optional[torch.Tensor]:
    return None if index is None else torch.tensor(index, dtype=torch.long)


class GroupedConvPath(nn.Module):
    """One path: gather channels -> grouped 1x1 conv -> batch norm -> activation."""

    def __init__(self, path: ConvPath, layer_in_channels: int, *, stride: int = 1, bias: bool = False, batch_norm: bool = True,
                 activation: ActivationSpec = None, batch_norm_scale: bool = True):
        super().__init__()
        self.path = path
        index = None if path.reads_unchanged(layer_in_channels) else path.input_index
        self.register_buffer("input_index", _index_buffer(index), persistent=False)
        self.conv = nn.Conv2d(path.in_channels, path.out_channels, 1, stride=stride,
                              groups=path.groups, bias=bias)
        self.bn = make_batch_norm(path.out_channels, scale=batch_norm_scale) if batch_norm else nn.Identity()
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_index is not None:
            x = x.index_select(1, self.input_index)
        return self.act(self.bn(self.conv(x)))


class GroupedConvLayer(nn.Module):
    """Layer K or L: its paths run on the same input and are concatenated (Eqs. 15 and 25)."""

    def __init__(self, layer: LayerPlan, **path_options):
        super().__init__()
        self.layer = layer
        self.paths = nn.ModuleList(GroupedConvPath(path, layer.in_channels, **path_options) for path in layer.paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [path(x) for path in self.paths]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class GroupedPointwiseConv2d(nn.Module):
    """Drop-in replacement for a 1x1 ``nn.Conv2d``: K -> interleave -> L, summed (Entropy 2022, Fig. 1).

    Args:
        in_channels, out_channels: channels of the dense 1x1 convolution being replaced.
        channels_per_group: the papers' ``Ch``, input channels per group.
        version: 1 (Mendel 2022, GCD grouping) or 2 (Entropy 2022, no divisibility constraint).
        l_layer: False for the papers' "no L" ablation (K only, no interleaving).
        activation: None, "relu", "swish", "sigmoid", "hard_swish" or an ``nn.Module``; applied at the
            end of every path, as in the reference.
        batch_norm: batch norm (affine) after every convolution path.
        bias: convolution bias in every path.
        stride: stride of layer K (L always has stride 1).
        batch_norm_scale: False for a batch norm that learns a shift only (Keras ``scale=False``, as in
            the reference's Inception V3).

    ``self.plan`` is the :class:`~gpconv.plan.PointwisePlan` being executed; ``print(block.plan)``
    shows it.
    """

    def __init__(self, in_channels: int, out_channels: int, channels_per_group: int, *, version: int = 2,
                 l_layer: bool = True, activation: ActivationSpec = None, batch_norm: bool = True,
                 bias: bool = False, stride: int = 1, batch_norm_scale: bool = True):
        super().__init__()
        check_activation(activation)
        check_positive_int("stride", stride)
        self.plan = make_plan(in_channels, out_channels, channels_per_group, version=version, l_layer=l_layer)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        options = dict(bias=bias, batch_norm=batch_norm, activation=activation, batch_norm_scale=batch_norm_scale)
        self.k = GroupedConvLayer(self.plan.k, stride=stride, **options)
        self.l = GroupedConvLayer(self.plan.l, **options) if self.plan.l is not None else None
        self.register_buffer("interleave_index", _index_buffer(self.plan.interleave), persistent=False)
        self.register_buffer("output_index", _index_buffer(self.plan.output_order), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"GroupedPointwiseConv2d expects an input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        k = self.k(x)
        if self.l is not None:
            mixed = k if self.interleave_index is None else k.index_select(1, self.interleave_index)
            return self.l(mixed) + k
        if self.output_index is not None:
            return k.index_select(1, self.output_index)
        return k

    def extra_repr(self) -> str:
        plan = self.plan
        state = "grouped" if plan.grouped else "dense"
        return (f"{plan.in_channels}, {plan.out_channels}, channels_per_group={plan.channels_per_group}, "
                f"version={plan.version}, l_layer={plan.l_layer}, stride={self.stride} ({state}, "
                f"{plan.weight_count:,} of {plan.dense_weight_count:,} weights)")


@dataclass(frozen=True)
class Grouping:
    """How a model builds its pointwise convolutions: ``channels_per_group=None`` keeps them dense
    (the baseline); otherwise they are :class:`GroupedPointwiseConv2d` with these settings."""

    channels_per_group: Optional[int] = None
    version: int = 2
    l_layer: bool = True

    def __post_init__(self):
        check_positive_int("channels_per_group", self.channels_per_group, allow_none=True)
        if self.channels_per_group is not None:  # validates version and l_layer too
            make_plan(2, 2, self.channels_per_group, version=self.version, l_layer=self.l_layer)

    @property
    def dense(self) -> bool:
        return self.channels_per_group is None


def pointwise_conv(in_channels: int, out_channels: int, grouping: Grouping, *, activation: ActivationSpec = None,
                   batch_norm: bool = True, bias: bool = False, stride: int = 1,
                   batch_norm_scale: bool = True) -> nn.Module:
    """A 1x1 convolution (+ batch norm + activation): dense for the baseline, grouped otherwise
    (the reference's ``kPointwiseConv2D``)."""
    if grouping.dense:
        return ConvBnAct(in_channels, out_channels, 1, stride=stride, bias=bias, batch_norm=batch_norm,
                         activation=activation, batch_norm_scale=batch_norm_scale)
    return GroupedPointwiseConv2d(in_channels, out_channels, grouping.channels_per_group, version=grouping.version,
                                  l_layer=grouping.l_layer, activation=activation, batch_norm=batch_norm,
                                  bias=bias, stride=stride, batch_norm_scale=batch_norm_scale)
