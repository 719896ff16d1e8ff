"""The grouped pointwise convolution block: executes a :class:`~gpconv.core.plan.PointwisePlan`.

Its ``"straightforward"`` execution (one gather and one grouped convolution per path, concatenation,
interleaving by index) is what the ``"fast"`` one is tested against; :meth:`GroupedPointwiseConv2d.fold`
gives its inference form. The words are defined in :mod:`gpconv.core.executions`; the layers K and L
are each a :class:`~gpconv.core.grouped_layer.GroupedConvLayer`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import (ActivationSpec, ConvBnAct, PlanIndices, PointwiseConvAttributes, check_activation,
                      gather_channels, is_traced)
from .executions import EXECUTIONS, check_word
from .folded import FoldedGroupedPointwiseConv2d, LayerFolding, batch_norm_scale_shift  # noqa: F401 (re-exported)
from .grouped_layer import GroupedConvLayer, GroupedConvPath, merged_to_canonical  # noqa: F401 (re-exported)
from .plan import PointwisePlan, check_positive_int, make_plan

# PointwiseConvAttributes, GroupedConvPath, GroupedConvLayer and LayerFolding: re-exported from the
# modules below this one (their names here are public).
__all__ = ["GroupedPointwiseConv2d", "GroupedPointwiseLinear", "PointwiseConvAttributes", "GroupedConvPath",
           "GroupedConvLayer", "LayerFolding", "Grouping", "pointwise_conv", "set_execution", "set_recompute"]


RECOMPUTE = ("all", "l_layer", "none")


def _set_on_blocks(model: nn.Module, attribute: str, mode: str) -> nn.Module:
    for module in model.modules():
        if isinstance(module, GroupedPointwiseConv2d):
            setattr(module, attribute, mode)
    return model


def set_execution(model: nn.Module, mode: str) -> nn.Module:
    """Select the execution (``"fast"`` or ``"straightforward"``, see :mod:`gpconv.core.executions`) of
    every :class:`GroupedPointwiseConv2d` in ``model``; returns ``model``."""
    return _set_on_blocks(model, "execution", check_word("execution", mode, EXECUTIONS))


def set_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Set :attr:`GroupedPointwiseConv2d.recompute` of every block in ``model``; returns ``model``."""
    return _set_on_blocks(model, "recompute", check_word("recompute", mode, RECOMPUTE))


@contextlib.contextmanager
def _batch_statistics_frozen(module: nn.Module):
    """While a checkpointed forward runs again for the backward pass, its batch norms must not update
    their running statistics a second time (momentum 0 keeps them; the batch counter is restored)."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, tracked) in zip(norms, saved):
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


class GroupedPointwiseConv2d(PointwiseConvAttributes, PlanIndices, nn.Module):
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

    ``self.plan`` is the :class:`~gpconv.core.plan.PointwisePlan` being executed; ``print(block.plan)``
    shows it.

    Code written for the ``nn.Conv2d`` it replaces can read the convolution's attributes:
    ``in_channels``, ``out_channels``, ``kernel_size`` ``(1, 1)``, ``stride`` ``(s, s)``, ``padding``
    ``(0, 0)``, ``dilation`` ``(1, 1)``, ``padding_mode`` ``"zeros"``, and ``groups`` 1: the groups of
    the dense convolution the block stands for (K and L are grouped inside; their groups are in
    ``plan``). Where the block is linear (no batch norm, no activation: what :func:`gpconv.convert`
    builds), ``weight`` and ``bias`` are those of the equivalent dense convolution (see
    :meth:`dense_equivalent`), computed on each read, so ``weight.dtype``/``weight.device``/``bias is
    None`` answer as for the convolution; writing to them changes nothing.
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
        self.stride = (stride, stride)
        options = dict(bias=bias, batch_norm=batch_norm, activation=activation, batch_norm_scale=batch_norm_scale)
        self.k = GroupedConvLayer(self.plan.k, stride=stride, **options)
        # L's dense form reads K's output directly: the interleaving is folded into its columns.
        self.l = (GroupedConvLayer(self.plan.l, column_map=self.plan.interleave, **options)
                  if self.plan.l is not None else None)
        self._execution = "fast"
        self._recompute = "all"
        self.register_index("interleave_index", self.plan.interleave)
        self.register_index("output_index", self.plan.output_order)

    @property
    def recompute(self) -> str:
        """What a training step recomputes in the backward pass instead of keeping (fast execution):

        * ``"all"`` (default): a block keeps only K's convolution output and runs K's batch norm and
          activation, L and the sum again in the backward pass. A dense 1x1 convolution + batch norm
          (+ activation) keeps its batch-norm input (and output); the block keeps less than that,
          which puts a k-model's training step clearly below the dense model's peak memory, at the
          price of a second batch-norm and activation pass over the expanded maps.
        * ``"l_layer"``: only blocks with an L layer recompute (their small L part), the expansions keep
          what autograd keeps: a little faster, about the dense model's memory. Without recomputation
          a block with L keeps three output-sized tensors (K's batch-norm input and output, L's
          batch-norm input) where a dense convolution + batch norm keeps one.
        * ``"none"``: keep everything autograd keeps.
        """
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        self._recompute = check_word("recompute", mode, RECOMPUTE)

    def _recomputes(self, x: torch.Tensor, k_conv: torch.Tensor) -> bool:
        if self._recompute == "none" or self._execution != "fast" or not self.training:
            return False
        if torch.compiler.is_compiling():  # the compiler's partitioner chooses what to recompute
            return False
        if not (torch.is_grad_enabled() and k_conv.requires_grad and x.shape[-1] * x.shape[-2] > 1):
            return False
        return self.l is not None or (self._recompute == "all" and not isinstance(self.k.act, nn.Identity))

    @property
    def execution(self) -> str:
        """``"fast"`` (default: each layer merged or scattered, see :class:`GroupedConvLayer`) or
        ``"straightforward"`` (one gather and one convolution per path); see :mod:`gpconv.core.executions`."""
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        self._execution = check_word("execution", mode, EXECUTIONS)
        for layer in self.layers:
            layer.form = layer.fast_form if mode == "fast" else "paths"

    @property
    def layers(self) -> tuple:
        """K, then L where the plan has one."""
        return (self.k,) if self.l is None else (self.k, self.l)

    def fold(self) -> nn.Module:
        """The inference form of this block (as timm's ``reparameterize()``): a
        :class:`~gpconv.core.folded.FoldedGroupedPointwiseConv2d` that computes what this block
        computes in eval mode, batch norms folded into the convolutions. The block is unchanged."""
        return FoldedGroupedPointwiseConv2d(self.plan, *(layer.folded() for layer in self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, in_channels, H, W)`` or, as for ``nn.Conv2d``, unbatched ``(in_channels, H, W)``;
        returns ``(N, out_channels, H', W')`` (``(out_channels, H', W')``), ``H' = ceil(H / stride)``.
        Empty batches, any memory format and every floating dtype of the weights are accepted; another
        shape raises a one-line ``ValueError``. Under ``torch.fx.symbolic_trace`` the operations are
        recorded for a 4-D input and nothing is recomputed."""
        if is_traced(x):
            return self._after_k_conv(self.k.conv_output(x))
        if x.dim() == 3 and x.shape[0] == self.in_channels:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"GroupedPointwiseConv2d expects an input of shape (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(x.shape)}")
        k_conv = self.k.conv_output(x)
        if self._recomputes(x, k_conv):
            return checkpoint(self._after_k_conv, k_conv, use_reentrant=False, context_fn=self._recompute_contexts)
        return self._after_k_conv(k_conv)

    def _recompute_contexts(self):
        return contextlib.nullcontext(), _batch_statistics_frozen(self)

    def _after_k_conv(self, k_conv: torch.Tensor) -> torch.Tensor:
        """K's batch norm and activation, L, and the sum (Eq. 25), from K's convolution output."""
        k = self.k.act(self.k.bn(k_conv))
        if self.l is None:
            return k if self.output_index is None else gather_channels(k, self.output_index)
        folded = self.l.form == "scattered" or self.interleave_index is None
        return self.l(k if folded else gather_channels(k, self.interleave_index)) + k

    def dense_equivalent(self):
        """``(weight, bias)`` of the dense 1x1 convolution this block computes, weight ``(out, in, 1, 1)``
        and bias ``(out,)`` or None, differentiable: ``K + L K`` with the interleaving folded into L's
        columns (Eq. 26). None when the block is not linear (batch norm or activation inside)."""
        if any(not (isinstance(layer.bn, nn.Identity) and isinstance(layer.act, nn.Identity)) for layer in self.layers):
            return None
        k_weight, k_bias = self.k.scattered_weight()
        k_weight = k_weight[:, :, 0, 0]
        if self.l is None:
            if self.output_index is None:
                return k_weight[:, :, None, None], k_bias
            order = self.output_index
            return k_weight[order][:, :, None, None], None if k_bias is None else k_bias[order]
        l_weight, l_bias = self.l.scattered_weight()  # columns already in K's order (interleaving folded in)
        l_weight = l_weight[:, :, 0, 0]
        weight = k_weight + l_weight @ k_weight
        bias = None if k_bias is None else k_bias + l_weight @ k_bias + l_bias
        return weight[:, :, None, None], bias

    def _dense_part(self, part: int, name: str):
        dense = self.dense_equivalent()
        if dense is None:
            raise AttributeError(f"GroupedPointwiseConv2d has no {name}: batch norm or activation inside the block")
        return dense[part]

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense convolution's weight ``(out, in, 1, 1)`` (linear blocks only)."""
        return self._dense_part(0, "weight")

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The equivalent dense convolution's bias, or None when the block has none (linear blocks only)."""
        return self._dense_part(1, "bias")

    def extra_repr(self) -> str:
        plan = self.plan
        state = "grouped" if plan.grouped else "dense"
        return (f"{plan.in_channels}, {plan.out_channels}, channels_per_group={plan.channels_per_group}, "
                f"version={plan.version}, l_layer={plan.l_layer}, stride={self.stride[0]} ({state}, "
                f"{plan.weight_count:,} of {plan.dense_weight_count:,} weights)")


class GroupedPointwiseLinear(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` over the last dimension: the same K -> interleave -> L
    block (:class:`GroupedPointwiseConv2d`, no batch norm) applied to the features of every position.

    The pointwise convolutions of channels-last blocks (ConvNeXt's ``pwconv1``/``pwconv2``) and the
    layers of an MLP are such linear layers. The input ``(..., in_features)`` runs through ``self.block``
    as a ``(1, in_features, positions, 1)`` map in ``channels_last`` memory format, a view of the same
    memory: no copy in or out. ``in_features``, ``out_features``, ``weight`` ``(out, in)`` and ``bias``
    answer as for the ``nn.Linear`` (see :class:`GroupedPointwiseConv2d`; activation None).
    """

    def __init__(self, in_features: int, out_features: int, channels_per_group: int, *, version: int = 2,
                 l_layer: bool = True, activation: ActivationSpec = None, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block = GroupedPointwiseConv2d(in_features, out_features, channels_per_group, version=version,
                                            l_layer=l_layer, activation=activation, batch_norm=False, bias=bias)

    @property
    def plan(self) -> PointwisePlan:
        return self.block.plan

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense ``nn.Linear`` weight ``(out_features, in_features)`` (no activation only)."""
        return self.block.weight[:, :, 0, 0]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.block.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_traced(x) and (x.dim() == 0 or x.shape[-1] != self.in_features):
            raise ValueError(f"GroupedPointwiseLinear expects an input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        positions = x.reshape(1, -1, 1, self.in_features).permute(0, 3, 1, 2)  # (1, C, positions, 1)
        if not is_traced(x) and x.numel() == 0:  # no positions: an empty batch of 1x1 maps instead of a 0-high map
            positions = x.reshape(0, self.in_features, 1, 1)
        y = self.block(positions)
        return y.permute(0, 2, 3, 1).reshape(x.shape[:-1] + (self.out_features,))


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
