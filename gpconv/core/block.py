"""The grouped pointwise convolution block: executes a :class:`~gpconv.core.plan.PointwisePlan`.

Its ``"straightforward"`` execution (one gather and one grouped convolution per path, concatenation,
interleaving by index) is what the ``"fast"`` one is tested against; :meth:`GroupedPointwiseConv2d.fold`
gives its inference form. The words are defined in :mod:`gpconv.core.executions`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import ActivationSpec, ConvBnAct, PlanIndices, check_activation, make_activation, make_batch_norm
from .executions import EXECUTIONS, LAYER_FORMS, LAYER_SCATTERED_MAC_RATIO, check_word
from .plan import ConvPath, Index, LayerPlan, PointwisePlan, check_positive_int, make_plan

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


class GroupedConvPath(PlanIndices, nn.Module):
    """One path of a layer: gather its input channels, then one grouped 1x1 convolution."""

    def __init__(self, path: ConvPath, layer_in_channels: int, *, stride: int = 1, bias: bool = False):
        super().__init__()
        self.path = path
        index = None if path.reads_unchanged(layer_in_channels) else path.input_index
        self.register_index("input_index", index)
        self.conv = nn.Conv2d(path.in_channels, path.out_channels, 1, stride=stride, groups=path.groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_index is not None:
            x = gather_channels(x, self.input_index)
        return self.conv(x)


class GroupedConvLayer(PlanIndices, nn.Module):
    """Layer K or L: its paths run on the same input and are concatenated (Eqs. 15 and 25), then
    batch norm and activation. One batch norm over the concatenation is the reference's per-path
    batch norms (batch norm works channel by channel), with the same parameters.

    Three forms (``form``, see :mod:`gpconv.core.executions`) with the same parameters and math:

    * ``"paths"``: one gather and one grouped convolution per path, then a concatenation;
    * ``"merged"``: the paths merged into one grouped convolution over one gather. The second path's
      one-filter groups read the first groups' channels (Eq. 14), so they become an extra filter of
      those groups; the other groups get an all-zero extra filter, dropped by the final reorder;
    * ``"scattered"``: one plain convolution whose weight is the layer's weights scattered into a dense
      ``(out, in)`` matrix, gathers and replication folded in (``column_map`` also folds a permutation
      of the input, e.g. the interleaving before L). More multiply-adds, no index operations, and
      oneDNN's dense kernels: faster for small layers.

    ``fast_form`` is the one a block's ``"fast"`` execution uses: ``"scattered"`` when the dense matrix
    costs at most ``LAYER_SCATTERED_MAC_RATIO`` times the grouped multiply-adds, else ``"merged"``.
    """

    def __init__(self, layer: LayerPlan, *, stride: int = 1, bias: bool = False, batch_norm: bool = True,
                 activation: ActivationSpec = None, batch_norm_scale: bool = True,
                 column_map: Optional[Index] = None):
        super().__init__()
        self.layer = layer
        self.stride = stride
        self.paths = nn.ModuleList(GroupedConvPath(path, layer.in_channels, stride=stride, bias=bias)
                                   for path in layer.paths)
        self.bn = make_batch_norm(layer.out_channels, scale=batch_norm_scale) if batch_norm else nn.Identity()
        self.act = make_activation(activation)
        self.register_index("merged_order", merged_to_canonical(layer))
        rows, columns = _scattered_positions(layer, column_map)
        self.register_index("scattered_rows", rows)
        self.register_index("scattered_columns", columns)
        dense_macs = layer.out_channels * layer.in_channels
        self.fast_form = "scattered" if dense_macs <= LAYER_SCATTERED_MAC_RATIO * layer.weight_count else "merged"
        self.form = self.fast_form

    @property
    def form(self) -> str:
        """How this layer runs: ``"paths"``, ``"merged"`` or ``"scattered"`` (see the class docstring)."""
        return self._form

    @form.setter
    def form(self, form: str) -> None:
        self._form = check_word("layer form", form, LAYER_FORMS)

    def scattered_weight(self):
        """Weight ``(out, in, 1, 1)`` and bias of the ``"scattered"`` form: the layer's weights scattered
        into one dense matrix, gathers folded in (differentiable)."""
        values = torch.cat([path.conv.weight.reshape(-1) for path in self.paths])
        dense = values.new_zeros(self.layer.out_channels, self.layer.in_channels)
        dense = dense.index_put((self.scattered_rows, self.scattered_columns), values, accumulate=True)
        bias = None
        if self.paths[0].conv.bias is not None:
            bias = torch.cat([path.conv.bias for path in self.paths])
        return dense[:, :, None, None], bias

    @property
    def merged_groups(self) -> int:
        return self.layer.paths[0].groups

    def merged_weight(self):
        """Weight and bias (or None) of the merged convolution, in merged channel order: group ``g``
        holds its main-path filters, then its second-path filter (or zeros)."""
        main = self.paths[0].conv
        groups, per_group = self.merged_groups, self.layer.paths[0].filters_per_group
        if len(self.paths) == 1:
            return main.weight, main.bias
        extra = self.paths[1].conv
        missing = groups - extra.out_channels
        weight = torch.cat([main.weight.reshape(groups, per_group, -1),
                            F.pad(extra.weight.reshape(extra.out_channels, 1, -1), (0, 0, 0, 0, 0, missing))], 1)
        weight = weight.reshape(groups * (per_group + 1), -1, 1, 1)
        bias = None
        if main.bias is not None:
            bias = torch.cat([main.bias.reshape(groups, per_group),
                              F.pad(extra.bias.reshape(-1, 1), (0, 0, 0, missing))], 1).reshape(-1)
        return weight, bias

    def folded(self) -> "LayerFolding":
        """The merged convolution with the batch norm folded in (eval-mode statistics): what the
        inference form of the layer runs (:meth:`GroupedPointwiseConv2d.fold`)."""
        with torch.no_grad():
            weight, bias = self.merged_weight()
            outputs = weight.shape[0]
            scale, shift = batch_norm_scale_shift(self.bn, self.layer.out_channels, weight)
            merged_scale = torch.zeros(outputs, dtype=weight.dtype, device=weight.device)
            merged_shift = torch.zeros(outputs, dtype=weight.dtype, device=weight.device)
            order = self.merged_order if self.merged_order is not None else torch.arange(outputs, device=weight.device)
            merged_scale[order] = scale
            merged_shift[order] = shift
            bias = merged_shift if bias is None else bias * merged_scale + merged_shift
            weight = weight * merged_scale[:, None, None, None]
        main = self.paths[0]
        return LayerFolding(weight, bias.clone(), self.merged_groups, self.stride, copy.deepcopy(self.act),
                            None if main.input_index is None else main.path.input_index,
                            merged_to_canonical(self.layer))

    def conv_output(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated path outputs (before batch norm), in the layer's channel order."""
        if self.form == "scattered":
            weight, bias = self.scattered_weight()
            return F.conv2d(x, weight, bias, self.stride)
        if self.form == "paths":
            outputs = [path(x) for path in self.paths]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        main = self.paths[0]
        if main.input_index is not None:
            x = gather_channels(x, main.input_index)
        weight, bias = self.merged_weight()
        merged = F.conv2d(x, weight, bias, self.stride, 0, 1, self.merged_groups)
        return merged if self.merged_order is None else gather_channels(merged, self.merged_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv_output(x)))


@dataclass(frozen=True)
class LayerFolding:
    """A :class:`GroupedConvLayer` folded for inference (:meth:`GroupedConvLayer.folded`): its merged
    grouped convolution with the batch norm folded into ``weight`` and ``bias``, output channels in
    merged order."""

    weight: torch.Tensor  # (merged outputs, channels per group, 1, 1)
    bias: torch.Tensor  # (merged outputs,)
    groups: int
    stride: int
    activation: nn.Module  # a copy of the layer's
    gather: Optional[Index]  # the input channels the merged convolution reads; None: all, in order
    order: Optional[Index]  # merged position of each of the layer's output channels; None: the same


def batch_norm_scale_shift(bn: nn.Module, channels: int, like: torch.Tensor):
    """``(scale, shift)`` per channel with ``bn(x) == x * scale + shift`` in eval mode (ones and zeros
    when ``bn`` is not a batch norm)."""
    if isinstance(bn, nn.BatchNorm2d):
        scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
        if bn.weight is not None:  # ShiftOnlyBatchNorm2d learns no scale
            scale = bn.weight * scale
        shift = -bn.running_mean * scale
        return scale, shift if bn.bias is None else shift + bn.bias
    return torch.ones(channels, dtype=like.dtype, device=like.device), torch.zeros(channels, dtype=like.dtype,
                                                                                   device=like.device)


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


def _scattered_positions(layer: LayerPlan, column_map: Optional[Index]):
    """Row and column in the dense ``(out, in)`` matrix of every weight of the layer's paths, in the
    order of the paths' flattened weights."""
    rows, columns = [], []
    first_row = 0
    for path in layer.paths:
        for filter_index in range(path.out_channels):
            group = filter_index // path.filters_per_group
            for position in range(path.channels_per_group):
                channel = path.input_index[group * path.channels_per_group + position]
                rows.append(first_row + filter_index)
                columns.append(channel if column_map is None else column_map[channel])
        first_row += path.out_channels
    return rows, columns


def merged_to_canonical(layer: LayerPlan) -> Optional[Index]:
    """For a layer with two paths: position in the merged convolution's output of each of the layer's
    output channels (main-path filters first, then the second path's). None for one path."""
    if len(layer.paths) == 1:
        return None
    main, extra = layer.paths
    width = main.filters_per_group + 1
    order = [g * width + f for g in range(main.groups) for f in range(main.filters_per_group)]
    return tuple(order + [g * width + main.filters_per_group for g in range(extra.groups)])


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
        :class:`~gpconv.core.inference.FoldedGroupedPointwiseConv2d` that computes what this block
        computes in eval mode, batch norms folded into the convolutions. The block is unchanged."""
        from .inference import FoldedGroupedPointwiseConv2d  # the inference module builds on this one
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
