"""One grouped layer of a block (K or L): its paths (Eqs. 15 and 25), batch norm and activation, in
the three layer forms of :mod:`gpconv.core.executions` (``paths``, ``merged``, ``scattered``), and its
folded inference form (:meth:`GroupedConvLayer.folded`)."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ActivationSpec, PlanIndices, gather_channels, make_activation, make_batch_norm
from .executions import LAYER_FORMS, LAYER_SCATTERED_MAC_RATIO, check_word
from .folded import LayerFolding, batch_norm_scale_shift
from .plan import ConvPath, Index, LayerPlan

__all__ = ["GroupedConvPath", "GroupedConvLayer", "merged_to_canonical"]


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
        inference form of the layer runs (:meth:`~gpconv.core.block.GroupedPointwiseConv2d.fold`)."""
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
