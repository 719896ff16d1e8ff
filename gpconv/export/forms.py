"""The inference form of a model that gpconv exports (:func:`onnx_form`), and the forms of its grouped
blocks, read and set as a whole (what tuning compares)."""

from __future__ import annotations

from torch import nn

from ..core.executions import FOLDED_EXECUTIONS
from ..core.inference import FoldedGroupedPointwiseConv2d, prepare_for_inference
from .deploy import DeployError

__all__ = ["ONNX_FORMS", "onnx_form"]

# The forms :func:`onnx_form` can give the grouped blocks: ``"rule"`` is prepare_for_inference's choice
# without timing (dense for small blocks, else factored where there is one, super-grouped); the others
# are the folded executions (gpconv.core.executions): every block in that execution where it has it
# ("dense" falls back to "factored"), group factor 1.
# Timed in ONNX Runtime (benchmarks/runtimes.py --onnx-forms, docs/performance.md), none was clearly
# faster than "rule", which is the default.
ONNX_FORMS = ("rule",) + FOLDED_EXECUTIONS


def onnx_form(model: nn.Module, form: str = "rule") -> nn.Module:
    """The eval-mode, NCHW inference copy of ``model`` that :func:`export_onnx` exports, its grouped
    blocks in ``form`` (one of :data:`ONNX_FORMS`)."""
    if form not in ONNX_FORMS:
        raise DeployError(f"unknown form {form!r}; expected one of: {', '.join(ONNX_FORMS)}")
    prepared = prepare_for_inference(model, channels_last=False)
    if form != "rule":
        _set_every_block(prepared, form)
    return prepared


def _set_every_block(prepared: nn.Module, form: str) -> None:
    """Every grouped block of ``prepared`` in the execution ``form`` where it has it ("dense" falls back to
    "factored", else "grouped"), group factor 1."""
    for block in prepared.modules():
        if isinstance(block, FoldedGroupedPointwiseConv2d):
            preference = (form, "factored") if form == "dense" else (form,)
            block.execution = next((e for e in preference if e in block.executions), "grouped")
            for layer in block.layers:
                layer.super_group(1)


def _block_forms(prepared: nn.Module) -> dict:
    """{block name: (execution, group factor of K, of L)} of every grouped block: what :func:`_restore_forms` sets."""
    return {name: (block.execution, *(layer.group_factor for layer in block.layers))
            for name, block in prepared.named_modules() if isinstance(block, FoldedGroupedPointwiseConv2d)}


def _restore_forms(prepared: nn.Module, forms: dict) -> None:
    blocks = dict(prepared.named_modules())
    for name, (execution, *factors) in forms.items():
        blocks[name].execution = execution
        for layer, factor in zip(blocks[name].layers, factors):
            layer.super_group(factor)
