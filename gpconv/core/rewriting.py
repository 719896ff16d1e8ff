"""What the model rewrites share (:func:`gpconv.convert`, :func:`gpconv.prepare_for_inference`,
:func:`gpconv.fit_to_dense`, :func:`gpconv.summarize`): which layers are plain pointwise ones, the copy
a rewrite works on, the note of a layer kept as it is, and the attributes a rewritten model carries."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .block import GroupedPointwiseConv2d, GroupedPointwiseLinear
from ..io import first_line

__all__ = ["GROUPED_BLOCKS", "KEPT_ATTRIBUTE", "FIT_ERROR_ATTRIBUTE", "KeptLayer", "copy_model", "is_plain_pointwise",
           "is_plain_linear"]

GROUPED_BLOCKS = (GroupedPointwiseConv2d, GroupedPointwiseLinear)
# Attribute of a converted model: the 1x1 convolutions (and, with linear=True, linear layers) left dense.
KEPT_ATTRIBUTE = "_gpconv_kept_dense"
# Attribute of a block that :func:`gpconv.core.fit.fit_to_dense` fitted: its relative output error.
FIT_ERROR_ATTRIBUTE = "fit_error"


@dataclass(frozen=True)
class KeptLayer:
    """A 1x1 convolution (or, with ``linear=True``, a linear layer) that ``convert`` left dense, and why."""

    name: str
    reason: str


def copy_model(model: nn.Module, function: str) -> nn.Module:
    """A deep copy of ``model`` for ``function`` to change, or a one-line ``ValueError`` naming why
    torch cannot copy it (such as old-style ``torch.nn.utils.weight_norm``, whose computed weight is not
    a leaf; ``torch.nn.utils.parametrizations.weight_norm`` copies)."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as error:
        raise ValueError(f"gpconv.{function} works on a copy of the model and torch cannot copy this one: "
                         f"{first_line(error)}") from None


def is_plain_pointwise(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` that is a plain 1x1 convolution: kernel 1x1, groups 1, padding 0,
    dilation 1 and a square stride."""
    if not isinstance(module, nn.Conv2d) or isinstance(module, GroupedPointwiseConv2d):
        return False
    padding_is_zero = module.padding in ("valid", (0, 0)) or (module.padding == "same" and module.stride == (1, 1))
    return (module.kernel_size == (1, 1) and module.groups == 1 and padding_is_zero
            and module.dilation == (1, 1) and module.stride[0] == module.stride[1])


def is_plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` itself; subclasses (such as attention's ``out_proj``, whose weight its
    parent reads directly) are left alone."""
    return type(module) is nn.Linear
