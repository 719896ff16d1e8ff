"""The inference form of a grouped pointwise block: :class:`FoldedGroupedPointwiseConv2d`.

:meth:`gpconv.core.block.GroupedPointwiseConv2d.fold` builds it from the plan and the block's layers K
and L, each folded (:class:`LayerFolding`: the merged grouped convolution with the batch norm folded
in). It has up to three executions (:mod:`gpconv.core.executions`): ``grouped`` (per layer one gather
and one merged grouped convolution, the interleaving and reorders composed), ``factored`` (K grouped,
then one dense convolution for L, the interleaving and the sum) and ``dense``; grouped layers
may merge ``s`` groups into one (block-diagonal weights) where oneDNN runs that faster.
:func:`choose_executions` picks each block's form, timed on an example batch (:mod:`gpconv.core.timing`)
or by rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import PointwiseConvAttributes, gather_channels
from .executions import FOLDED_DENSE_MAC_RATIO, FOLDED_EXECUTIONS
from .plan import Index, PointwisePlan
from .timing import Timer, torch_seconds

__all__ = ["FoldedGroupedPointwiseConv2d", "LayerFolding", "batch_norm_scale_shift", "choose_executions"]


@dataclass(frozen=True)
class LayerFolding:
    """A :class:`~gpconv.core.grouped_layer.GroupedConvLayer` folded for inference (its ``folded()``):
    its merged grouped convolution with the batch norm folded into ``weight`` and ``bias``, output
    channels in merged order."""

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


class _FoldedLayer(nn.Module):
    """One grouped layer with its batch norm folded in (a :class:`LayerFolding`),
    output in merged channel order."""

    def __init__(self, folding: LayerFolding):
        super().__init__()
        self.weight = nn.Parameter(folding.weight, requires_grad=False)
        self.bias = nn.Parameter(folding.bias, requires_grad=False)
        self.groups = folding.groups
        self.stride = folding.stride
        self.act = folding.activation
        self.group_factor = 1  # see super_group()
        self.register_buffer("conv_weight", None)

    def group_factors(self, max_channels: int = 128):
        """Factors ``s`` (divisors of the group count) :meth:`super_group` accepts, up to ``s`` groups'
        channels reaching ``max_channels``; 1 (no change) first."""
        per_group = self.weight.shape[1]
        return [s for s in range(1, self.groups + 1) if self.groups % s == 0 and (s == 1 or s * per_group <= max_channels)]

    def super_group(self, factor: int) -> None:
        """Run the convolution with ``groups // factor`` groups, each new group's weight block-diagonal
        over ``factor`` consecutive groups (zeros elsewhere): same outputs in the same order, ``factor``
        times the multiply-adds, and much faster oneDNN kernels when groups have only a few filters."""
        if self.groups % factor:
            raise ValueError(f"group factor {factor} does not divide {self.groups} groups")
        self.group_factor = factor
        self.conv_weight = None if factor == 1 else _super_grouped(self.weight, self.groups, factor)

    def scattered_weight(self, gather: Optional[torch.Tensor], in_channels: int) -> torch.Tensor:
        """The layer scattered into one dense ``(outputs, in_channels)`` matrix, its input gather folded
        in (the ``"scattered"`` layer form, here for 1x1 maps)."""
        outputs, per_group = self.weight.shape[0], self.weight.shape[1]
        filters_per_group = outputs // self.groups
        rows = torch.arange(outputs, device=self.weight.device).repeat_interleave(per_group)
        columns = (rows // filters_per_group) * per_group + torch.arange(per_group, device=rows.device).repeat(outputs)
        if gather is not None:
            columns = gather[columns]
        dense = torch.zeros(outputs, in_channels, dtype=self.weight.dtype, device=self.weight.device)
        return dense.index_put_((rows, columns), self.weight.reshape(-1), accumulate=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.conv_weight is None else self.conv_weight
        return self.act(F.conv2d(x, weight, self.bias, self.stride, 0, 1, self.groups // self.group_factor))


def _super_grouped(weight: torch.Tensor, groups: int, factor: int) -> torch.Tensor:
    """The weight of a grouped 1x1 convolution (``groups`` groups) as one with ``groups // factor``
    groups: new group ``j`` holds old groups ``j*factor ... j*factor + factor - 1`` on its diagonal."""
    outputs, per_group = weight.shape[:2]
    filters = outputs // groups
    blocks = weight.reshape(groups // factor, factor, filters, per_group)
    result = weight.new_zeros(groups // factor, factor, filters, factor, per_group)
    for position in range(factor):
        result[:, position, :, position, :] = blocks[:, position]
    result = result.reshape(outputs, factor * per_group, 1, 1)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        result = result.contiguous(memory_format=torch.channels_last)
    return result


def _compose(outer: Optional[Index], inner: Optional[Index], length: int) -> Optional[Index]:
    """Index map of ``x[inner][outer]`` (``None`` = identity); None again when the result is identity
    over a tensor of ``length`` channels."""
    if outer is None and inner is None:
        return None
    if outer is None:
        result = tuple(inner)
    elif inner is None:
        result = tuple(outer)
    else:
        result = tuple(inner[i] for i in outer)
    return None if result == tuple(range(length)) else result


def _buffer(index: Optional[Index], device) -> Optional[torch.Tensor]:
    return None if index is None else torch.tensor(index, dtype=torch.long, device=device)


class FoldedGroupedPointwiseConv2d(PointwiseConvAttributes, nn.Module):
    """Inference form of a trained :class:`GroupedPointwiseConv2d`, built by its
    :meth:`~GroupedPointwiseConv2d.fold` from the plan and the folded layers K and L (see the module
    docstring)."""

    def __init__(self, plan: PointwisePlan, k: LayerFolding, l: Optional[LayerFolding] = None):
        super().__init__()
        if (l is None) != (plan.l is None):
            raise ValueError("FoldedGroupedPointwiseConv2d needs a folded L exactly when the plan has an L layer")
        self.plan = plan
        self.in_channels, self.out_channels, self.stride = plan.in_channels, plan.out_channels, (k.stride, k.stride)
        device = k.weight.device
        self.k = _FoldedLayer(k)
        self.register_buffer("input_index", _buffer(k.gather, device))
        self.l = None
        if l is not None:
            self.l = _FoldedLayer(l)
            # L's gathered position q -> interleaved position -> K channel -> K's merged position
            l_input = _compose(l.gather, _compose(plan.interleave, k.order, -1), k.weight.shape[0])
            self.register_buffer("l_input_index", _buffer(l_input, device))
            self.register_buffer("l_output_index", _buffer(l.order, device))
            self.register_buffer("k_output_index", _buffer(k.order, device))
        else:
            self.register_buffer("k_output_index", _buffer(_compose(plan.output_order, k.order, -1), device))
        # On 1x1 maps (squeeze-excitation) a grouped convolution call costs far more than the work:
        # there each layer runs scattered: one small dense matrix product with its gather folded in.
        self.register_buffer("k_scattered", self.k.scattered_weight(self.input_index, self.in_channels))
        self.register_buffer("l_scattered", None if self.l is None else
                             self.l.scattered_weight(self.l_input_index, self.k.weight.shape[0]))
        # Where the block is linear up to one final activation (no L, or no activation inside), it
        # also has a dense form: one plain 1x1 convolution. For small layers the dense kernels beat
        # the grouped ones despite the extra multiply-adds; ``prepare_for_inference`` picks per block.
        dense = self._dense_form()
        self.register_buffer("dense_weight", None if dense is None else dense[0])
        self.register_buffer("dense_bias", None if dense is None else dense[1])
        self.dense_act = None if dense is None else dense[2]
        # Where K and L have no activation (the projections), L, the interleaving, the sum and the final
        # reorder together are one small dense matrix over K's merged outputs: the "factored" form runs
        # K grouped, then one dense 1x1 convolution (out x K's outputs multiply-adds per pixel).
        factored = self._factored_form()
        self.register_buffer("factored_weight", None if factored is None else factored[0])
        self.register_buffer("factored_bias", None if factored is None else factored[1])
        self._execution = "grouped"

    @staticmethod
    def _rows(matrix: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
        return matrix if order is None else matrix.index_select(0, order)

    def _dense_form(self):
        """(weight, bias, activation) of the equivalent dense 1x1 convolution, or None when the block
        has a nonlinearity between K and the output other than one final activation."""
        k_weight, k_bias = self.k_scattered, self.k.bias
        if self.l is None:
            return (self._rows(k_weight, self.k_output_index)[:, :, None, None],
                    self._rows(k_bias, self.k_output_index), self.k.act)
        if not (isinstance(self.k.act, nn.Identity) and isinstance(self.l.act, nn.Identity)):
            return None
        l_weight = self._rows(self.l_scattered, self.l_output_index)
        weight = l_weight @ k_weight + self._rows(k_weight, self.k_output_index)
        bias = l_weight @ k_bias + self._rows(self.l.bias, self.l_output_index) + self._rows(k_bias,
                                                                                             self.k_output_index)
        return weight[:, :, None, None], bias, nn.Identity()

    def _factored_form(self):
        """(weight, bias) of the dense 1x1 convolution that maps K's merged outputs to the block's
        output (L, interleaving, sum and reorders folded in), or None when K or L has an activation."""
        if self.l is None or not (isinstance(self.k.act, nn.Identity) and isinstance(self.l.act, nn.Identity)):
            return None
        k_merged = self.k.weight.shape[0]
        identity = torch.eye(k_merged, dtype=self.k_scattered.dtype, device=self.k_scattered.device)
        weight = self._rows(self.l_scattered, self.l_output_index) + self._rows(identity, self.k_output_index)
        return weight[:, :, None, None], self._rows(self.l.bias, self.l_output_index)

    @property
    def layers(self) -> Tuple[_FoldedLayer, ...]:
        """K, then L where the plan has one."""
        return (self.k,) if self.l is None else (self.k, self.l)

    @property
    def executions(self) -> Tuple[str, ...]:
        """The executions (:data:`~gpconv.core.executions.FOLDED_EXECUTIONS`) this block has: ``"grouped"``
        always (K and L grouped, gathers between), ``"factored"`` (K grouped, then one dense convolution)
        and ``"dense"`` (one dense convolution) where the block is linear enough for them."""
        available = {"grouped": True, "factored": self.factored_weight is not None,
                     "dense": self.dense_weight is not None}
        return tuple(execution for execution in FOLDED_EXECUTIONS if available[execution])

    @property
    def execution(self) -> str:
        return self._execution

    @property
    def form(self) -> str:
        """The execution with its group factors (:meth:`_FoldedLayer.super_group`): ``"dense"``,
        ``"factored K2"`` or ``"grouped K2 L1"``."""
        if self._execution == "dense":
            return "dense"
        text = f"{self._execution} K{self.k.group_factor}"
        return text if self.l is None or self._execution == "factored" else f"{text} L{self.l.group_factor}"

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in self.executions:
            raise ValueError(f"this block's executions are {', '.join(self.executions)}; got {mode!r}")
        self._execution = mode

    def tune(self, x: torch.Tensor, timer: Optional[Timer] = None) -> str:
        """Time this block on ``x`` (an input like the ones to come) and keep its fastest form: the group
        factor of K and of L (see :meth:`_FoldedLayer.super_group`), then the execution. Returns it.

        ``timer(module, input)`` gives the seconds ``module`` takes on ``input`` (default: in torch, best of
        3 calls; :func:`gpconv.export.runtime_timer` times it in ONNX Runtime or OpenVINO instead)."""
        timer = timer or torch_seconds
        with torch.inference_mode():
            gathered = x if self.input_index is None else gather_channels(x, self.input_index)
            _keep_fastest_factor(self.k, gathered, timer)
            if self.l is not None:
                k = self.k(gathered)
                _keep_fastest_factor(self.l, k if self.l_input_index is None else gather_channels(k, self.l_input_index),
                                     timer)
            timings = {}
            for execution in self.executions:
                self.execution = execution
                timings[execution] = timer(self, x)
        self.execution = min(timings, key=timings.get)
        return self.execution

    def _forward_1x1(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k.act(F.linear(x.flatten(1), self.k_scattered, self.k.bias))
        k_out = k if self.k_output_index is None else k.index_select(1, self.k_output_index)
        if self.l is not None:
            l = self.l.act(F.linear(k, self.l_scattered, self.l.bias))
            k_out = (l if self.l_output_index is None else l.index_select(1, self.l_output_index)) + k_out
        return k_out.reshape(x.shape[0], self.out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, in_channels, H, W)`` or unbatched ``(in_channels, H, W)``, as the block it folds."""
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.shape[-1] == 1 and x.shape[-2] == 1:
            return self._forward_1x1(x)
        if self._execution == "dense":
            return self.dense_act(F.conv2d(x, self.dense_weight, self.dense_bias, self.k.stride))
        if self.input_index is not None:
            x = gather_channels(x, self.input_index)
        k = self.k(x)
        if self._execution == "factored":
            return F.conv2d(k, self.factored_weight, self.factored_bias)
        k_out = k if self.k_output_index is None else gather_channels(k, self.k_output_index)
        if self.l is None:
            return k_out
        mixed = k if self.l_input_index is None else gather_channels(k, self.l_input_index)
        l = self.l(mixed)
        l_out = l if self.l_output_index is None else gather_channels(l, self.l_output_index)
        return l_out + k_out

    def extra_repr(self) -> str:
        factors = "" if self._execution == "dense" else f", group factors K {self.k.group_factor}" + (
            "" if self.l is None or self._execution == "factored" else f" L {self.l.group_factor}")
        return (f"{self.in_channels}, {self.out_channels}, channels_per_group={self.plan.channels_per_group}, "
                f"folded, {self._execution}{factors}")


def _keep_fastest_factor(layer: _FoldedLayer, x: torch.Tensor, timer: Timer) -> None:
    timings = {}
    for factor in layer.group_factors():
        layer.super_group(factor)
        timings[factor] = timer(layer, x)
    layer.super_group(min(timings, key=timings.get))


def _default_factor(layer: _FoldedLayer, min_filters: int = 8) -> int:
    """Without timings: the smallest group factor that gives every group at least ``min_filters``
    filters (oneDNN's grouped kernels are slow with a few filters per group; benchmarks/benchmark.py)."""
    filters = layer.weight.shape[0] // layer.groups
    return next((s for s in layer.group_factors() if s * filters >= min_filters), 1)


def _timing_key(block: FoldedGroupedPointwiseConv2d, x: torch.Tensor) -> tuple:
    """What a block's timings depend on: its plan, gathers, activations and forms, and the input's shape,
    layout, type and device (not the weights' values)."""
    layers = [(layer.weight.shape, layer.groups, layer.stride, type(layer.act)) for layer in block.layers]
    gathers = tuple(getattr(block, index, None) is None for index in ("input_index", "k_output_index", "l_input_index",
                                                                 "l_output_index"))
    layout = (x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last))
    return block.plan, tuple(layers), gathers, tuple(block.executions), tuple(x.shape), layout, x.dtype, x.device


def _set_form(block: FoldedGroupedPointwiseConv2d, k_factor: int, l_factor: Optional[int], execution: str) -> None:
    block.k.super_group(k_factor)
    if block.l is not None:
        block.l.super_group(l_factor)
    block.execution = execution


def choose_executions(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                      timer: Optional[Timer] = None) -> Dict[str, str]:
    """Pick the execution (and group factors) of every :class:`FoldedGroupedPointwiseConv2d` of ``model``.

    With ``example_input``, each block is timed in each of its forms on the input it receives
    (:meth:`FoldedGroupedPointwiseConv2d.tune`, with ``timer``: torch by default); otherwise the dense form is used when it needs at most
    ``FOLDED_DENSE_MAC_RATIO`` times the grouped multiply-adds, else the factored form where there is one,
    with :func:`_default_factor`. Blocks of the same shape on inputs of the same shape are timed once
    (:func:`_timing_key`). Returns ``{block name: execution}``."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, FoldedGroupedPointwiseConv2d)}
    inputs: Dict[str, torch.Tensor] = {}
    if example_input is not None:
        hooks = [block.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0]))
                 for name, block in blocks.items()]
        try:
            with torch.inference_mode():
                model(example_input)
        finally:
            for hook in hooks:
                hook.remove()
    chosen, timed = {}, {}
    for name, block in blocks.items():
        x = inputs.get(name)
        if x is not None and x.shape[-1] * x.shape[-2] > 1:
            key = _timing_key(block, x)
            if key in timed:  # a block of the same shape on the same input shape: the same timings
                _set_form(block, *timed[key])
            else:
                block.tune(x, timer)
                timed[key] = (block.k.group_factor, None if block.l is None else block.l.group_factor, block.execution)
            chosen[name] = block.execution
            continue
        for layer in block.layers:
            layer.super_group(_default_factor(layer))
        dense_macs = block.in_channels * block.out_channels
        if "dense" in block.executions and dense_macs <= FOLDED_DENSE_MAC_RATIO * block.plan.weight_count:
            block.execution = "dense"
        else:
            block.execution = "factored" if "factored" in block.executions else "grouped"
        chosen[name] = block.execution
    return chosen
