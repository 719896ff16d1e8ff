"""Inference form of a model: batch norms folded, grouped blocks folded (block.fold()), channels_last.

``prepare_for_inference(model)`` returns an eval-mode copy whose outputs equal ``model.eval()``'s
(within float rounding) and that runs fewer passes over memory:

* every ``Conv2d -> BatchNorm2d`` pair inside an ``nn.Sequential`` becomes one convolution (exactly
  these classes, no parametrizations, no forward hooks: only what provably computes the same thing is
  rewritten; the rest is kept and listed by :func:`inference_summary`);
* dense 1x1 convolutions run as matrix products on 1x1 maps (squeeze-excitation), for every model;
* every :class:`~gpconv.core.block.GroupedPointwiseConv2d` folds itself
  (:meth:`~gpconv.core.block.GroupedPointwiseConv2d.fold`) into a :class:`FoldedGroupedPointwiseConv2d`
  with up to three executions (:mod:`gpconv.core.executions`): ``grouped`` (per layer one gather and one
  merged grouped convolution with the batch norm folded in, the interleaving and reorders composed),
  ``factored`` (K grouped, then one dense convolution for L, the interleaving and the sum) and
  ``dense``; grouped layers may merge ``s`` groups into one (block-diagonal weights) where oneDNN runs
  that faster;
* Keras' pad-then-convolve (``KerasPad2d`` + convolution) becomes one convolution without the padded
  copy (:class:`KerasSameConv2d`);
* weights in ``channels_last`` memory format where the model's own code accepts channels_last maps
  (an example batch is tried; without one, models made of torch's and gpconv's modules only).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .block import (GroupedPointwiseConv2d, Index, LayerFolding, PointwiseConvAttributes, batch_norm_scale_shift,
                    gather_channels)
from .convert import KeptLayer, copy_model, is_plain_pointwise
from .executions import FOLDED_DENSE_MAC_RATIO, FOLDED_EXECUTIONS
from ..layers import KerasPad2d, ShiftOnlyBatchNorm2d
from .plan import PointwisePlan
from ..io import first_line

__all__ = ["prepare_for_inference", "choose_executions", "torch_seconds", "Timer", "FoldedGroupedPointwiseConv2d", "KerasSameConv2d",
           "fold_batch_norm", "inference_summary", "InferenceSummary", "rewrite_refusal"]

# How a form is timed: (module, an input like the ones to come) -> seconds (torch_seconds, or a runtime's).
Timer = Callable[[nn.Module, torch.Tensor], float]


class _FoldedLayer(nn.Module):
    """One grouped layer with its batch norm folded in (a :class:`~gpconv.core.block.LayerFolding`),
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


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution equal to ``bn(conv(x))`` in eval mode."""
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        scale, shift = batch_norm_scale_shift(bn, conv.out_channels, conv.weight)
        folded.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        folded.bias = nn.Parameter(bias.clone())
    return folded


class PointwiseConv(PointwiseConvAttributes, nn.Module):
    """A dense 1x1 convolution (stride 1) for inference that runs as a matrix product on 1x1 maps (the
    squeeze-excitation convolutions), where a convolution call costs far more than its work."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = conv.in_channels, conv.out_channels, (1, 1)
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[-1] == 1 and x.shape[-2] == 1:
            return F.linear(x.flatten(1), self.weight.flatten(1), self.bias).reshape(x.shape[0], self.out_channels, 1, 1)
        return F.conv2d(x, self.weight, self.bias)


class KerasSameConv2d(nn.Module):
    """``KerasPad2d`` + a 'valid' convolution without the padded copy of the input.

    Keras pads ``k // 2 - 1`` before and ``k // 2`` after an even-sized dimension (``k // 2`` on both
    sides of an odd one). The same output comes from a symmetric padding of ``k // 2`` and, along an
    even dimension, a kernel one tap longer whose first tap is zero: that tap reads the extra padding
    row in front. Four weights (even or odd height and width) are kept; the input picks one.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        kernel = conv.kernel_size[0]
        self.stride, self.groups, self.padding = conv.stride, conv.groups, kernel // 2
        weight = conv.weight.detach()
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        for even_height in (False, True):
            for even_width in (False, True):
                padded = F.pad(weight, (int(even_width), 0, int(even_height), 0))
                self.register_buffer(self._name(even_height, even_width), padded.clone())

    @staticmethod
    def _name(even_height: bool, even_width: bool) -> str:
        return f"weight_{'even' if even_height else 'odd'}_{'even' if even_width else 'odd'}"

    @staticmethod
    def replaces(pad: nn.Module, conv: nn.Module) -> bool:
        """Whether ``pad`` followed by ``conv`` is the pattern this module replaces."""
        return (isinstance(pad, KerasPad2d) and type(conv) is nn.Conv2d and conv.padding == (0, 0)
                and conv.dilation == (1, 1) and conv.kernel_size == (pad.kernel_size, pad.kernel_size)
                and pad.kernel_size % 2 == 1 and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, self._name(x.shape[-2] % 2 == 0, x.shape[-1] % 2 == 0))
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, 1, self.groups)


# The batch norms whose eval-mode computation ``batch_norm_scale_shift`` states exactly.
FOLDABLE_BATCH_NORMS = (nn.BatchNorm2d, ShiftOnlyBatchNorm2d)
# Activations that act on each element alone: a folded block may apply them in its merged channel order.
ELEMENTWISE_ACTIVATIONS = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                           nn.GELU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh)


def rewrite_refusal(module: nn.Module, types: Tuple[type, ...]) -> Optional[str]:
    """Why ``module`` may not be rewritten by a form that computes what ``types`` compute; None when it
    may: it is exactly one of ``types`` (a subclass may compute something else), has no
    parametrization (its weight is computed) and no forward hooks (they would see another module's
    inputs or outputs)."""
    if parametrize.is_parametrized(module):
        return "parametrized"
    if type(module) not in types:
        return f"{type(module).__name__} is not {' or '.join(t.__name__ for t in types)}"
    if module._forward_hooks or module._forward_pre_hooks:
        return "forward hooks"
    return None


def _block_refusal(block: GroupedPointwiseConv2d) -> Optional[str]:
    """Why a grouped block may not be folded (see :func:`rewrite_refusal`); None when it may."""
    for name, module in block.named_modules():
        reason = rewrite_refusal(module, (type(module),))
        if reason is not None:
            return reason if not name else f"{name}: {reason}"
    if type(block) is not GroupedPointwiseConv2d:
        return f"{type(block).__name__} is not GroupedPointwiseConv2d"
    for layer_name, layer in zip("kl", block.layers):
        if not isinstance(layer.bn, nn.Identity) and (type(layer.bn) not in FOLDABLE_BATCH_NORMS
                                                      or layer.bn.running_mean is None):
            return f"{layer_name}.bn: {type(layer.bn).__name__} without running statistics or not a plain batch norm"
        if type(layer.act) not in ELEMENTWISE_ACTIVATIONS:
            return f"{layer_name}.act: {type(layer.act).__name__} is not known to act on each element alone"
    return None


@dataclass
class InferenceSummary:
    """What :func:`prepare_for_inference` rewrote and what it kept as it was, and why; ``print()`` it.

    ``rewritten``: ``(module name, what was done)``; ``kept``: the modules a rewrite was possible for in
    kind but not provably equal (hooks, parametrizations, subclasses, unknown activations);
    ``channels_last``: whether the weights were converted, and why."""

    rewritten: List[Tuple[str, str]] = field(default_factory=list)
    kept: List[KeptLayer] = field(default_factory=list)
    channels_last: bool = False
    memory_format_reason: str = ""

    def __str__(self) -> str:
        counts: Dict[str, int] = {}
        for _, what in self.rewritten:
            counts[what] = counts.get(what, 0) + 1
        done = ", ".join(f"{count} {what}" for what, count in counts.items()) or "nothing rewritten"
        lines = [f"prepare_for_inference: {done}",
                 f"channels_last: {'on' if self.channels_last else 'off'} ({self.memory_format_reason})"]
        return "\n".join(lines + [f"kept as it is: {layer.name or '(model)'} ({layer.reason})" for layer in self.kept])


def inference_summary(model: nn.Module) -> InferenceSummary:
    """The :class:`InferenceSummary` of a model returned by :func:`prepare_for_inference`; a
    ``ValueError`` for any other model."""
    summary = getattr(model, SUMMARY_ATTRIBUTE, None)
    if summary is None:
        raise ValueError("the model was not returned by prepare_for_inference: no inference summary")
    return summary


BN_FOLDED, BLOCK_FOLDED, POINTWISE_MATMUL, KERAS_PAD_MERGED = (
    "batch norms folded into convolutions", "grouped blocks folded", "1x1 convolutions as matrix products on 1x1 maps",
    "Keras paddings merged into convolutions")
SUMMARY_ATTRIBUTE = "_gpconv_inference_summary"


@dataclass
class _Rewrite:
    summary: InferenceSummary
    # id of a module -> (the module, its rewritten form): a module shared by several parents stays shared;
    # holding the module keeps its id from being reused by a new one.
    done: Dict[int, Tuple[nn.Module, nn.Module]] = field(default_factory=dict)

    def result(self, module: nn.Module) -> Optional[nn.Module]:
        entry = self.done.get(id(module))
        return None if entry is None else entry[1]

    def record(self, module: nn.Module, result: nn.Module) -> nn.Module:
        self.done[id(module)] = (module, result)
        return result

    def refuse(self, name: str, reason: Optional[str]) -> bool:
        if reason is not None and all(layer.name != name for layer in self.summary.kept):
            self.summary.kept.append(KeptLayer(name, reason))
        return reason is not None


def _fold_sequential(module: nn.Sequential, prefix: str, rewrite: _Rewrite) -> None:
    children = list(module._modules.items())
    for (name, first), (next_name, second) in zip(children, children[1:]):
        if not (isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d)):
            continue
        reason = rewrite_refusal(first, (nn.Conv2d,)) or rewrite_refusal(second, FOLDABLE_BATCH_NORMS)
        if reason is None and second.running_mean is None:
            reason = "batch norm without running statistics"
        if not rewrite.refuse(prefix + name, reason and f"{reason}; {next_name} not folded in"):
            module._modules[name] = fold_batch_norm(first, second)
            module._modules[next_name] = nn.Identity()
            rewrite.summary.rewritten.append((prefix + name, BN_FOLDED))
    children = list(module._modules.items())  # after folding: the convolution may have been replaced
    for (name, first), (next_name, second) in zip(children, children[1:]):
        if KerasSameConv2d.replaces(first, second) and not rewrite.refuse(
                prefix + name, rewrite_refusal(first, (KerasPad2d,)) or rewrite_refusal(second, (nn.Conv2d,))):
            module._modules[name] = nn.Identity()
            module._modules[next_name] = KerasSameConv2d(second)
            rewrite.summary.rewritten.append((prefix + next_name, KERAS_PAD_MERGED))


def _rewrite(module: nn.Module, name: str, rewrite: _Rewrite) -> nn.Module:
    """``module`` with its foldable parts rewritten (in place where it is a container), depth first."""
    if rewrite.result(module) is not None:
        return rewrite.result(module)
    rewrite.record(module, module)
    if isinstance(module, GroupedPointwiseConv2d):
        if rewrite.refuse(name, _block_refusal(module)):
            return module
        rewrite.summary.rewritten.append((name, BLOCK_FOLDED))
        return rewrite.record(module, module.fold())
    prefix = f"{name}." if name else ""
    for child_name, child in list(module._modules.items()):  # named_children() would skip shared modules
        if child is not None:
            module._modules[child_name] = _rewrite(child, prefix + child_name, rewrite)
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        _fold_sequential(module, prefix, rewrite)
    for child_name, child in list(module._modules.items()):
        if isinstance(child, nn.Conv2d) and is_plain_pointwise(child) and child.stride == (1, 1):
            if rewrite.result(child) not in (None, child):
                module._modules[child_name] = rewrite.result(child)
            elif not rewrite.refuse(prefix + child_name, rewrite_refusal(child, (nn.Conv2d,))):
                module._modules[child_name] = rewrite.record(child, PointwiseConv(child))
                rewrite.summary.rewritten.append((prefix + child_name, POINTWISE_MATMUL))
    return module


def _seconds(function, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up call (oneDNN primitive creation)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def torch_seconds(module: nn.Module, x: torch.Tensor) -> float:
    """The default :data:`Timer`: seconds of ``module(x)`` in torch (:func:`_seconds`); on a GPU up to the
    end of its kernels (CUDA calls return before they run)."""
    if x.is_cuda:
        return _seconds(lambda: (module(x), torch.cuda.synchronize(x.device)))
    return _seconds(lambda: module(x))


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


def choose_executions(model: nn.Module, example_input: Optional[torch.Tensor] = None,
                      timer: Optional[Timer] = None) -> Dict[str, str]:
    """Pick the execution (and group factors) of every :class:`FoldedGroupedPointwiseConv2d` of ``model``.

    With ``example_input``, each block is timed in each of its forms on the input it receives
    (:meth:`FoldedGroupedPointwiseConv2d.tune`, with ``timer``: torch by default); otherwise the dense form is used when it needs at most
    ``FOLDED_DENSE_MAC_RATIO`` times the grouped multiply-adds, else the factored form where there is one,
    with :func:`_default_factor`. Returns ``{block name: execution}``."""
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
    chosen = {}
    for name, block in blocks.items():
        x = inputs.get(name)
        if x is not None and x.shape[-1] * x.shape[-2] > 1:
            chosen[name] = block.tune(x, timer)
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


def _forward_is_known(module: nn.Module) -> bool:
    """Whether ``module``'s class comes from torch.nn or gpconv, whose forwards accept channels_last maps."""
    return type(module).__module__.startswith(("torch.nn.", "gpconv."))


def _restore_memory_format(module: nn.Module, args, kwargs, output):
    """Forward hook of a channels_last model: a 4-D output comes back contiguous when the input was (the
    memory format the model had before its weights were converted)."""
    first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
    if (first is not None and first.is_contiguous() and isinstance(output, torch.Tensor) and output.dim() == 4
            and not output.is_contiguous()):
        return output.contiguous()
    return None


def _use_channels_last(prepared: nn.Module, example_input: Optional[torch.Tensor],
                       channels_last: Optional[bool]) -> Tuple[bool, str]:
    """Convert ``prepared``'s weights to channels_last where that keeps the model's own code working;
    returns (converted, why)."""
    if channels_last is not None:
        if channels_last:
            prepared.to(memory_format=torch.channels_last)
        return channels_last, f"channels_last={channels_last}"
    if example_input is None:
        unknown = sorted({type(m).__name__ for m in prepared.modules() if not _forward_is_known(m)})
        if unknown:
            return False, (f"the forward of {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} may not accept "
                           "channels_last maps; an example_input tries it")
        prepared.to(memory_format=torch.channels_last)
        return True, "every module is torch's or gpconv's"
    prepared.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            prepared(example_input)
    except RuntimeError as error:
        prepared.to(memory_format=torch.contiguous_format)
        return False, f"the model fails on channels_last maps: {first_line(error)}"
    return True, "the example batch runs"


def prepare_for_inference(model: nn.Module, example_input: Optional[torch.Tensor] = None, *,
                          channels_last: Optional[bool] = None, compile: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` for inference whose outputs equal ``model.eval()``'s (within float
    rounding): batch norms folded, grouped blocks folded (:class:`FoldedGroupedPointwiseConv2d`), dense
    1x1 convolutions as matrix products on 1x1 maps, optionally ``channels_last`` weights and
    ``torch.compile``. The original model is unchanged.

    A module is rewritten only where the rewrite provably computes the same thing: exactly
    ``nn.Conv2d`` followed by exactly ``nn.BatchNorm2d`` with running statistics inside a plain
    ``nn.Sequential``, :class:`GroupedPointwiseConv2d` blocks with plain batch norms and elementwise
    activations, and none of them parametrized or with forward hooks (see :func:`rewrite_refusal`).
    The others are kept as they are, listed by :func:`inference_summary` with the reason and named in
    one warning. With global forward hooks registered nothing is rewritten.

    ``example_input`` (a batch like the ones to come) lets each grouped block be timed in each of its
    forms and group factors and keep the fastest (:func:`choose_executions`); without it a rule picks.

    ``channels_last``: None (default) converts the weights to channels_last where the model's code is
    known to accept channels_last maps: the example batch runs with them, or, without one, every
    module comes from torch.nn or gpconv. True forces it, False keeps the memory format. With
    channels_last on, a 4-D output comes back contiguous for a contiguous input, as before.
    """
    summary = InferenceSummary()
    prepared = copy_model(model, "prepare_for_inference").eval()
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        summary.kept.append(KeptLayer("", "global forward hooks registered: nothing rewritten"))
    else:
        prepared = _rewrite(prepared, "", _Rewrite(summary))
    if summary.kept:
        kept = ", ".join(f"{layer.name or '(model)'} ({layer.reason})" for layer in summary.kept)
        warnings.warn(f"gpconv.prepare_for_inference: {len(summary.kept)} modules kept as they are (not provably "
                      f"equal when rewritten): {kept}", UserWarning, stacklevel=2)
    for parameter in prepared.parameters():
        parameter.requires_grad_(False)
    summary.channels_last, summary.memory_format_reason = _use_channels_last(prepared, example_input, channels_last)
    if summary.channels_last:
        prepared.register_forward_hook(_restore_memory_format, with_kwargs=True)
        if example_input is not None:
            example_input = example_input.contiguous(memory_format=torch.channels_last) if example_input.dim() == 4 \
                else example_input
    choose_executions(prepared, example_input)
    object.__setattr__(prepared, SUMMARY_ATTRIBUTE, summary)
    if compile:
        prepared = torch.compile(prepared)
    return prepared
