"""``summarize``: the grouped pointwise layers of a model with their parameters before and after, and
for a model from :func:`gpconv.convert` the layers it left dense and why (``print()`` the result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from .block import GroupedPointwiseConv2d, GroupedPointwiseLinear
from .rewriting import FIT_ERROR_ATTRIBUTE, GROUPED_BLOCKS, KEPT_ATTRIBUTE, KeptLayer, is_plain_pointwise
from ..io import render_table

__all__ = ["summarize", "ConversionSummary", "ReplacedLayer"]


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
    linear: bool = False  # a GroupedPointwiseLinear (replacing an nn.Linear)
    channels_per_group: Optional[int] = None
    fit_error: Optional[float] = None  # relative output error after gpconv.shrink.fit_to_dense, if fitted


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`summarize` found; ``print()`` it for a table."""

    rows: List[ReplacedLayer]
    dense_pointwise: int  # plain 1x1 convolutions still dense (too small to group, or excluded)
    model_params: int
    kept: List[KeptLayer] = field(default_factory=list)  # what convert left dense, and why

    def _kept_lines(self) -> List[str]:
        return [f"kept dense by convert: {layer.name} ({layer.reason})" for layer in self.kept]

    @property
    def params_before(self) -> int:
        """Trainable parameters of the model with every listed block dense again."""
        return self.model_params + sum(row.params_before - row.params_after for row in self.rows)

    def __str__(self) -> str:
        if not self.rows:
            found = (f"{self.dense_pointwise} dense 1x1 convolutions, none grouped" if self.dense_pointwise
                     else "the model has no 1x1 convolutions: nothing to group")
            return "\n".join([f"no grouped pointwise convolutions ({found}; {self.model_params:,} trainable "
                              "parameters)"] + self._kept_lines())
        fitted = any(row.fit_error is not None for row in self.rows)
        header = ("layer", "in", "out", "stride", "Ch", "params before", "params after") + (
            ("fit error",) if fitted else ()) + ("",)
        body = [(row.name, str(row.in_channels), str(row.out_channels), str(row.stride), str(row.channels_per_group),
                 f"{row.params_before:,}", f"{row.params_after:,}")
                + ((("-" if row.fit_error is None else f"{row.fit_error:.3f}"),) if fitted else ())
                + ((("linear" if row.linear else "") if row.grouped else "dense (too small to group)"),)
                for row in self.rows]
        lines = [render_table(header, body)]
        grouped = sum(row.grouped for row in self.rows)
        lines.append(f"{grouped} grouped pointwise convolutions, {len(self.rows) - grouped} kept dense inside a block, "
                     f"{self.dense_pointwise} plain dense 1x1 convolutions")
        lines.append(f"trainable parameters: {self.params_before:,} -> {self.model_params:,} "
                     f"({100 * self.model_params / max(1, self.params_before):.1f}%)")
        return "\n".join(lines + self._kept_lines())


def _row(name: str, block: GroupedPointwiseConv2d, linear: bool) -> ReplacedLayer:
    after = sum(p.numel() for p in block.parameters() if p.requires_grad)
    # bias and batch-norm parameters of layer K cover each output channel once, as the dense ones would
    per_channel = sum(p.numel() for p_name, p in block.k.named_parameters()
                      if p.requires_grad and not p_name.endswith("conv.weight"))
    fit_error = getattr(block, FIT_ERROR_ATTRIBUTE, None)
    return ReplacedLayer(name, block.in_channels, block.out_channels, block.stride[0], block.plan.grouped,
                         block.plan.dense_weight_count + per_channel, after, linear, block.plan.channels_per_group,
                         fit_error)


def summarize(model: nn.Module) -> ConversionSummary:
    """List every :class:`GroupedPointwiseConv2d` and :class:`GroupedPointwiseLinear` of ``model`` (from
    :func:`convert` or a gpconv model): name, channels, and trainable parameters before (dense 1x1
    convolution or linear layer with the same bias and batch norm) and after; for a model from
    :func:`convert`, also the layers it left dense and why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"summarize expects an nn.Module, got {type(model).__name__}")
    rows: List[ReplacedLayer] = []
    dense_pointwise = 0
    seen = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, GROUPED_BLOCKS):
            seen.update(id(m) for m in module.modules())
            linear = isinstance(module, GroupedPointwiseLinear)
            rows.append(_row(name, module.block if linear else module, linear))
        elif is_plain_pointwise(module):
            dense_pointwise += 1
    model_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ConversionSummary(rows, dense_pointwise, model_params, list(getattr(model, KEPT_ATTRIBUTE, ())))
