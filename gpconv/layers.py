"""Small building blocks shared by the block, its folded form and the model families."""

from __future__ import annotations

import copy
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .core.plan import interleave_permutation

__all__ = ["ACTIVATIONS", "make_activation", "make_batch_norm", "ShiftOnlyBatchNorm2d", "KerasPad2d", "StochasticDepth",
           "ConvBnAct", "SqueezeExcite", "ChannelInterleave", "make_divisible", "PlanIndices",
           "PointwiseConvAttributes", "is_traced", "gather_channels"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "hard_swish": nn.Hardswish,
    "hard_sigmoid": nn.Hardsigmoid,
}

ActivationSpec = Union[None, str, nn.Module]


class PlanIndices:
    """Mixin for modules whose integer index buffers (channel gathers, reorders) follow from their
    plan alone: the buffers stay out of the ``state_dict`` (checkpoints hold weights only) and are
    derived again from a CPU copy of the plan's indices whenever they could be lost:

    * after ``_apply`` (``to``, ``cuda``, ``to_empty``...): a module built under
      ``torch.device("meta")`` and moved with ``to_empty`` gets its indices, not uninitialised memory;
    * after ``load_state_dict(..., assign=True)`` into a module still on the meta device: the indices
      follow the loaded weights' device.

    ``register_index(name, index)`` registers one (``index`` a sequence of ints, or None).
    """

    def register_index(self, name: str, index) -> None:
        if "_index_sources" not in self.__dict__:
            self._index_sources = {}
        source = None if index is None else torch.tensor(index, dtype=torch.long, device="cpu")
        self._index_sources[name] = source
        device = torch.empty(0).device  # the default device: meta under ``with torch.device("meta")``
        self.register_buffer(name, None if source is None else source.to(device), persistent=False)

    def _restore_indices(self, device=None) -> None:
        for name, source in self._index_sources.items():
            buffer = self._buffers.get(name)
            if source is None or buffer is None:
                continue
            target = buffer.device if device is None else device
            if target.type == "meta" or (buffer.device == target and torch.equal(buffer.cpu(), source)):
                continue
            self._buffers[name] = source.to(target)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._restore_indices()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if any(buffer is not None and buffer.is_meta for buffer in self._buffers.values()):
            loaded = next((value for key, value in state_dict.items() if key.startswith(prefix)
                           and isinstance(value, torch.Tensor) and not value.is_meta), None)
            if loaded is not None:
                self._restore_indices(loaded.device)


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


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), one ``divisor``
    more when that would be more than 10% down: Keras' EfficientNet ``round_filters`` and the
    reference's MobileNet V3 ``_depth`` (the same rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * value else rounded)


def make_activation(activation: ActivationSpec) -> nn.Module:
    """A fresh activation module: ``None`` gives ``nn.Identity``; a module is deep-copied so that
    every path owns its own instance."""
    check_activation(activation)
    if activation is None:
        return nn.Identity()
    if isinstance(activation, nn.Module):
        return copy.deepcopy(activation)
    return ACTIVATIONS[activation]()


class ShiftOnlyBatchNorm2d(nn.BatchNorm2d):
    """Batch norm with a learned shift but no learned scale (Keras ``BatchNormalization(scale=False)``,
    which Inception V3's ``conv2d_bn`` uses): one trainable parameter per channel instead of two."""

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(num_features))


def make_batch_norm(channels: int, *, scale: bool = True, eps: float = 1e-3) -> nn.BatchNorm2d:
    """Keras-default batch norm (epsilon 1e-3, momentum 0.99); ``scale=False`` learns the shift only."""
    if scale:
        return nn.BatchNorm2d(channels, eps=eps, momentum=0.01)
    return ShiftOnlyBatchNorm2d(channels, eps=eps)


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
                 activation: ActivationSpec = None, padding=None, batch_norm_scale: bool = True):
        if padding is None:  # 'same' for odd kernels, square or not
            padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, tuple) else kernel_size // 2
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                            groups=groups, bias=bias)]
        if batch_norm:
            layers.append(make_batch_norm(out_channels, scale=batch_norm_scale))
        if activation is not None:
            layers.append(make_activation(activation))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * expand(reduce(mean(x)))``. ``reduce`` and ``expand`` are given
    built (dense or grouped pointwise convolutions, each with its own activation)."""

    def __init__(self, reduce: nn.Module, expand: nn.Module):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = reduce
        self.expand = expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.expand(self.reduce(self.pool(x)))


class ChannelInterleave(PlanIndices, nn.Module):
    """Parameter-free channel permutation (the reference's ``InterleaveChannels``): output channel
    ``i`` is input channel ``interleave_permutation(channels, step)[i]`` (the identity for ``step < 2``)."""

    def __init__(self, channels: int, step: int):
        super().__init__()
        self.channels, self.step = channels, step
        self.register_index("order", list(interleave_permutation(channels, step) or range(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.order)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, step={self.step}"


class PointwiseConvAttributes:
    """The attributes of a plain 1x1 ``nn.Conv2d`` that third-party code reads from a convolution
    (TensorFlow-style padding reads ``stride``, ``kernel_size`` and ``dilation`` as pairs), for modules
    that stand for one; ``in_channels``, ``out_channels`` and ``stride`` ``(s, s)`` are set per instance.
    ``groups`` is 1: the groups of the dense convolution stood for, not of the layers inside."""

    kernel_size = (1, 1)
    padding = (0, 0)
    dilation = (1, 1)
    padding_mode = "zeros"
    groups = 1
    transposed = False
    output_padding = (0, 0)


def is_traced(x) -> bool:
    """True while ``torch.fx.symbolic_trace`` (``x`` is a proxy) or ``torch.jit.trace`` runs: a forward
    then records its operations without shape checks or memory-format choices, which would be control
    flow on the proxy (or constants in the trace)."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` that keeps a ``channels_last`` tensor in that format (a plain
    ``index_select`` first copies the whole tensor to NCHW)."""
    if is_traced(x):
        return x.index_select(1, index)
    if x.dim() == 4 and x.shape[-1] * x.shape[-2] > 1 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        batch, _, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: (pixels, channels)
        gathered = rows.index_select(1, index)  # on 2-D: a 4-D inner-dim index_select is ~20x slower
        return gathered.reshape(batch, height, width, index.numel()).permute(0, 3, 1, 2)
    return x.index_select(1, index)
