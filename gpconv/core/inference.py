"""Inference form of a model: batch norms folded, grouped blocks folded (block.fold()), channels_last.

``prepare_for_inference(model)`` returns an eval-mode copy whose outputs equal ``model.eval()``'s
(within float rounding) and that runs fewer passes over memory:

* every ``Conv2d -> BatchNorm2d`` pair inside an ``nn.Sequential`` becomes one convolution (exactly
  these classes, no parametrizations, no forward hooks: only what provably computes the same thing is
  rewritten; the rest is kept and listed by :func:`inference_summary`);
* dense 1x1 convolutions run as matrix products on 1x1 maps (squeeze-excitation), for every model;
* every :class:`~gpconv.core.block.GroupedPointwiseConv2d` folds itself
  (:meth:`~gpconv.core.block.GroupedPointwiseConv2d.fold`) into a
  :class:`~gpconv.core.folded.FoldedGroupedPointwiseConv2d` with up to three executions
  (:mod:`gpconv.core.executions`): ``grouped`` (per layer one gather and one merged grouped
  convolution with the batch norm folded in, the interleaving and reorders composed), ``factored``
  (K grouped, then one dense convolution for L, the interleaving and the sum) and ``dense``; grouped
  layers may merge ``s`` groups into one (block-diagonal weights) where oneDNN runs that faster;
* Keras' pad-then-convolve (``KerasPad2d`` + convolution) becomes one convolution without the padded
  copy (:class:`KerasSameConv2d`);
* weights in ``channels_last`` memory format where the model's own code accepts channels_last maps
  (an example batch is tried; without one, models made of torch's and gpconv's modules only).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .block import GroupedPointwiseConv2d
from .folded import FoldedGroupedPointwiseConv2d, batch_norm_scale_shift, choose_executions
from ..layers import KerasPad2d, PointwiseConvAttributes, ShiftOnlyBatchNorm2d
from .rewriting import KeptLayer, copy_model, is_plain_pointwise
from .timing import Timer, _seconds, torch_seconds  # noqa: F401 (_seconds: benchmarks and export time with it)
from ..io import first_line

# FoldedGroupedPointwiseConv2d, choose_executions (gpconv/core/folded.py), Timer and torch_seconds
# (gpconv/core/timing.py): re-exported, their names here are public.
__all__ = ["prepare_for_inference", "choose_executions", "torch_seconds", "Timer", "FoldedGroupedPointwiseConv2d", "KerasSameConv2d",
           "fold_batch_norm", "inference_summary", "InferenceSummary", "rewrite_refusal"]


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
