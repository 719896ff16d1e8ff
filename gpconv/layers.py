"""Small building blocks shared by the block and the model families."""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "make_activation", "KerasPad2d", "StochasticDepth", "ConvBnAct"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "hard_swish": nn.Hardswish,
}

ActivationSpec = Union[None, str, nn.Module]


def check_activation(activation: ActivationSpec) -> None:
    """Raise a one-line error unless ``activation`` is None, a known name or an ``nn.Module``."""
    if activation is None or isinstance(activation, nn.Module):
        return
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            allowed = ", ".join(repr(name) for name in ACTIVATIONS)
            raise ValueError(f"unknown activation {activation!r}; expected None, {allowed} or an nn.Module")
        return
    raise TypeError(f"activation must be None, a name or an nn.Module, got {type(activation).__name__}")


def make_activation(activation: ActivationSpec) -> nn.Module:
    """A fresh activation module: ``None`` gives ``nn.Identity``; a module is deep-copied so that
    every path owns its own instance."""
    check_activation(activation)
    if activation is None:
        return nn.Identity()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    return ACTIVATIONS[activation]()


class KerasPad2d(nn.Module):
    """Keras' asymmetric zero padding before a 'valid' strided convolution (``correct_pad``).

    For an even input size it pads one pixel less at the top/left than at the bottom/right. The
    reference pads this way even for its stride-1 stem, which is why a 32x32 input gives 31x31 maps.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.kernel_size // 2
        adjust_h = 1 - x.shape[-2] % 2
        adjust_w = 1 - x.shape[-1] % 2
        return F.pad(x, (half - adjust_w, half, half - adjust_h, half))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class StochasticDepth(nn.Module):
    """Drops a residual branch per sample with probability ``rate`` in training (drop connect)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class ConvBnAct(nn.Sequential):
    """Convolution -> optional batch norm -> optional activation (the reference's ``conv2d_bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1,
                 groups: int = 1, bias: bool = False, batch_norm: bool = True,
                 activation: ActivationSpec = None, padding: Optional[int] = None):
        padding = (kernel_size // 2) if padding is None else padding
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                            groups=groups, bias=bias)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01))
        if activation is not None:
            layers.append(make_activation(activation))
        super().__init__(*layers)
