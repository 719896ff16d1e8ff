"""Convert any PyTorch model: replace its 1x1 convolutions by grouped pointwise blocks.

``convert`` applies the papers' recipe (Mendel 2022; Entropy 2022, Section 3) to a model gpconv did
not build: every plain 1x1 ``nn.Conv2d`` (groups 1, no padding, no dilation, the same stride on both
axes) whose plan is worth grouping (``make_plan(...).grouped``: small layers stay dense, by the rule
the block itself uses) becomes a :class:`~gpconv.block.GroupedPointwiseConv2d` with the same input
and output channels, stride, bias, dtype and device. Everything else is left as it is.
``summarize`` lists the grouped pointwise layers of a model with their parameters before and after.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from .block import GroupedPointwiseConv2d, Grouping
from .layers import ActivationSpec, check_activation
from .plan import make_plan

__all__ = ["convert", "summarize", "ConversionSummary", "ReplacedLayer", "is_plain_pointwise"]


def is_plain_pointwise(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` that is a plain 1x1 convolution: kernel 1x1, groups 1, padding 0,
    dilation 1 and a square stride."""
    if not isinstance(module, nn.Conv2d) or isinstance(module, GroupedPointwiseConv2d):
        return False
    padding_is_zero = module.padding in ("valid", (0, 0)) or (module.padding == "same" and module.stride == (1, 1))
    return (module.kernel_size == (1, 1) and module.groups == 1 and padding_is_zero
            and module.dilation == (1, 1) and module.stride[0] == module.stride[1])


def _patterns(exclude: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    if isinstance(exclude, str):
        return (exclude,)
    try:
        patterns = tuple(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a pattern or a sequence of patterns, got {type(exclude).__name__}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"exclude patterns must be strings, got {pattern!r}")
    return patterns


def _excluded(name: str, patterns: Tuple[str, ...], matched: set) -> bool:
    """A module is excluded when its dotted name, or the name of one of its parents, matches."""
    parts = name.split(".")
    hit = False
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(".".join(parts[:end]), pattern) for end in range(1, len(parts) + 1)):
            matched.add(pattern)
            hit = True
    return hit


def convert(model: nn.Module, channels_per_group: int = 16, *, version: int = 2, l_layer: bool = True,
            activation: ActivationSpec = None, exclude: Union[str, Iterable[str]] = ()) -> nn.Module:
    """Return a deep copy of ``model`` whose 1x1 convolutions are grouped pointwise blocks.

    The input model is not modified. Each plain 1x1 ``nn.Conv2d`` (see :func:`is_plain_pointwise`)
    whose plan is grouped becomes ``GroupedPointwiseConv2d(in, out, channels_per_group,
    version=version, l_layer=l_layer, activation=activation, batch_norm=False, bias=<conv had
    one>, stride=<conv's>)``: no batch norm and no activation inside the block by default, since the
    convolution had none (a batch norm or activation that followed it in ``model`` stays). The new
    blocks are freshly initialised (grouped weights cannot be derived from dense ones): convert,
    then train or fine-tune. Depthwise, grouped, spatial and existing grouped pointwise layers are
    untouched; a convolution shared by several parents stays shared.

    Args:
        channels_per_group: the papers' ``Ch`` (Entropy 2022, Eq. 7).
        version: 1 (Mendel 2022) or 2 (Entropy 2022). ``l_layer=False``: K only ("no L" rows).
        activation: None or an activation applied at the end of every path of each block.
        exclude: ``fnmatch`` patterns of module names (``"classifier.*"``, ``"layer4"``) to keep dense;
            a module is excluded if its name or a parent's name matches. A pattern matching no
            module gives a warning.

    A model without 1x1 convolutions comes back as an unchanged copy; ``summarize`` says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    Grouping(channels_per_group, version, l_layer)  # one-line errors for bad grouping settings
    check_activation(activation)
    patterns = _patterns(exclude)
    converted = copy.deepcopy(model)
    matched: set = set()
    for name, _ in converted.named_modules():
        if name:
            _excluded(name, patterns, matched)
    replacements: Dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):  # named_children() would skip shared modules
            name = f"{prefix}{child_name}"
            if child is None or isinstance(child, GroupedPointwiseConv2d):
                continue
            if is_plain_pointwise(child):
                if id(child) not in replacements:
                    replacements[id(child)] = _replacement(child, name, channels_per_group, version, l_layer,
                                                           activation, patterns)
                setattr(parent, child_name, replacements[id(child)])
            else:
                visit(child, name + ".")

    visit(converted, "")
    for pattern in patterns:
        if pattern not in matched:
            warnings.warn(f"gpconv.convert: exclude pattern {pattern!r} matches no module", UserWarning, stacklevel=2)
    return converted


def _replacement(conv: nn.Conv2d, name: str, channels_per_group: int, version: int, l_layer: bool,
                 activation: ActivationSpec, patterns: Tuple[str, ...]) -> nn.Module:
    if _excluded(name, patterns, set()):
        return conv
    if not make_plan(conv.in_channels, conv.out_channels, channels_per_group, version=version, l_layer=l_layer).grouped:
        return conv
    block = GroupedPointwiseConv2d(conv.in_channels, conv.out_channels, channels_per_group, version=version,
                                   l_layer=l_layer, activation=activation, batch_norm=False,
                                   bias=conv.bias is not None, stride=conv.stride[0])
    block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    block.train(conv.training)
    return block


@dataclass(frozen=True)
class ReplacedLayer:
    """One grouped pointwise block: its name, shape and trainable parameters against the dense 1x1
    convolution (with the same bias and batch norm) it stands for."""

    name: str
    in_channels: int
    out_channels: int
    stride: int
    grouped: bool
    params_before: int
    params_after: int


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`summarize` found; ``print()`` it for a table."""

    rows: List[ReplacedLayer]
    dense_pointwise: int  # plain 1x1 convolutions still dense (too small to group, or excluded)
    model_params: int

    @property
    def params_before(self) -> int:
        """Trainable parameters of the model with every listed block dense again."""
        return self.model_params + sum(row.params_before - row.params_after for row in self.rows)

    def __str__(self) -> str:
        if not self.rows:
            found = (f"{self.dense_pointwise} dense 1x1 convolutions, none grouped" if self.dense_pointwise
                     else "the model has no 1x1 convolutions: nothing to group")
            return f"no grouped pointwise convolutions ({found}; {self.model_params:,} trainable parameters)"
        header = ("layer", "in", "out", "stride", "params before", "params after", "")
        body = [(row.name, str(row.in_channels), str(row.out_channels), str(row.stride), f"{row.params_before:,}",
                 f"{row.params_after:,}", "" if row.grouped else "dense (too small to group)") for row in self.rows]
        widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                 .rstrip() for line in [header] + body]
        lines.insert(1, "-" * len(lines[0]))
        grouped = sum(row.grouped for row in self.rows)
        lines.append(f"{grouped} grouped pointwise convolutions, {len(self.rows) - grouped} kept dense inside a block, "
                     f"{self.dense_pointwise} plain dense 1x1 convolutions")
        lines.append(f"trainable parameters: {self.params_before:,} -> {self.model_params:,} "
                     f"({100 * self.model_params / max(1, self.params_before):.1f}%)")
        return "\n".join(lines)


def summarize(model: nn.Module) -> ConversionSummary:
    """List every :class:`GroupedPointwiseConv2d` of ``model`` (from :func:`convert` or a gpconv model):
    name, channels, and trainable parameters before (dense 1x1 convolution with the same bias and
    batch norm) and after."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"summarize expects an nn.Module, got {type(model).__name__}")
    rows: List[ReplacedLayer] = []
    dense_pointwise = 0
    seen = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, GroupedPointwiseConv2d):
            seen.update(id(m) for m in module.modules())
            after = sum(p.numel() for p in module.parameters() if p.requires_grad)
            # bias and batch-norm parameters of layer K cover each output channel once, as the dense ones would
            per_channel = sum(p.numel() for p_name, p in module.k.named_parameters()
                              if p.requires_grad and not p_name.endswith("conv.weight"))
            rows.append(ReplacedLayer(name, module.in_channels, module.out_channels, module.stride,
                                      module.plan.grouped, module.plan.dense_weight_count + per_channel, after))
        elif is_plain_pointwise(module):
            dense_pointwise += 1
    model_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ConversionSummary(rows, dense_pointwise, model_params)
