"""Counting: trainable parameters, multiply-accumulates and the papers' "computations".

``count_macs`` and ``count_computations`` run one forward pass at batch 1 under a
``TorchDispatchMode`` that sees every aten operation, so they work on any model, including ones
converted by gpconv, not only on the models gpconv builds.

The papers' "computations" column is TensorFlow's profiler ``float_operation`` total at batch 1,
divided by 2. We reproduce the profiler's rules for the operations a CNN uses:

=============================  =============================================================
operation                      TensorFlow profiler float operations
=============================  =============================================================
convolution (any groups)       2 x output elements x kernel area x input channels per group
transposed convolution         2 x input elements x kernel area x output channels per group
matrix multiply                2 x output elements x inner dimension (mm, addmm, bmm, baddbmm,
                               addbmm, mv, addmv, dot)
attention (scaled dot product) 2 x (L x S x E + L x S x Ev) per batch and head, + 5 x L x S
                               for its softmax
bias add                       output elements
sub / mul / div                output elements (SE scaling is a Mul)
add                            0: TF 2.x emits ``AddV2`` for additions (residual sums, the K + L
                               sum), which the TF 2.6 profiler the authors used does not count
swish                          output elements (TF computes ``x * sigmoid(x)``: one Mul)
hard swish / hard sigmoid      2 / 1 per element (``x * (relu6(x + 3) * 1/6)``: two Muls)
global average pool (Mean)     input elements
average / max pooling          kernel area x output elements (TF's ``AvgPool``/``MaxPool`` rules)
softmax                        5 per element (the Keras classifier ends with softmax)
batch norm, ReLU, ReLU6,       0 (not registered with the profiler)
sigmoid,
copies, concatenation, pads
=============================  =============================================================

The reference models end with a softmax inside the network; ours return logits, so
``count_computations`` adds the softmax of the output (``softmax_output=True``).

Any other operation with a floating-point result (layer norm, GELU, tanh, ...) is counted as zero
and named: ``OperationCounter.uncounted``, and one warning from ``count_computations`` (from
``count_macs`` for the ones that are neither elementwise nor a norm, reduction, pooling or softmax,
which could hide multiply-accumulates), instead of a silently low number.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Dict, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .block import GroupedPointwiseConv2d
from ..io import first_line

__all__ = ["count_parameters", "count_macs", "count_computations", "OperationCounter"]

aten = torch.ops.aten

InputSize = Union[int, Tuple[int, int], Tuple[int, int, int]]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (``requires_grad``); batch-norm running statistics are buffers and do
    not count, as in Keras' "trainable params"."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


_ELEMENTWISE = {
    aten.sub.Tensor: 1, aten.sub_.Tensor: 1,
    aten.mul.Tensor: 1, aten.mul_.Tensor: 1, aten.div.Tensor: 1, aten.div_.Tensor: 1, aten.mul.Scalar: 1,
    aten.silu.default: 1, aten.silu_.default: 1,
    aten.hardswish.default: 2, aten.hardswish_.default: 2,
    aten.hardsigmoid.default: 1, aten.hardsigmoid_.default: 1,
    aten._softmax.default: 5, aten._safe_softmax.default: 5,
}


_MATRIX_PRODUCTS = {aten.mm: 0, aten.bmm: 0, aten.mv: 0, aten.dot: 0, aten.vdot: 0,  # position of the left operand
                    aten.addmm: 1, aten.baddbmm: 1, aten.addbmm: 1, aten.addmv: 1}
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
              aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
              aten._scaled_dot_product_attention_math}
# Counted as zero by the rules (the table's last rows, and operations that only create, copy or move data).
_FREE = {aten.add, aten.add_, aten.native_batch_norm, aten._native_batch_norm_legit,
         aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional, aten.relu, aten.relu_,
         aten.hardtanh, aten.hardtanh_, aten.sigmoid, aten.sigmoid_, aten.cat, aten.stack, aten.constant_pad_nd,
         aten.clone, aten._to_copy, aten.copy_, aten.index_select, aten.index, aten.index_put, aten.index_put_,
         aten.gather, aten.empty, aten.empty_like, aten.empty_strided, aten.zeros, aten.zeros_like, aten.ones,
         aten.ones_like, aten.full, aten.new_zeros, aten.new_empty, aten.new_ones, aten.fill_, aten.zero_,
         aten.arange, aten.scalar_tensor, aten.lift_fresh, aten.lift_fresh_copy, aten.detach, aten._unsafe_view,
         aten.contiguous, aten.dropout, aten.native_dropout}
# Operations without multiply-accumulates besides the elementwise ones: not worth a count_macs warning.
_NO_MACS = {aten.native_layer_norm, aten.native_group_norm, aten._softmax, aten._safe_softmax, aten._log_softmax, aten.avg_pool2d,
            aten.max_pool2d_with_indices, aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d,
            aten.upsample_bilinear2d}


class OperationCounter(TorchDispatchMode):
    """Accumulates multiply-accumulates and TensorFlow-profiler float operations per aten op.

    ``uncounted``: ``{operation: calls}`` of the operations with a floating-point result that the rules
    (module docstring) count as zero without naming them; ``uncounted_macs``: those of them that could
    hold multiply-accumulates (not elementwise, not a norm, reduction, pooling or softmax)."""

    def __init__(self):
        super().__init__()
        self.macs = 0
        self.tf_flops = 0
        self.by_operation: Dict[str, int] = defaultdict(int)
        self.uncounted: Dict[str, int] = defaultdict(int)
        self.uncounted_macs: Dict[str, int] = defaultdict(int)

    def _add(self, name: str, macs: int, flops: int) -> None:
        self.macs += macs
        self.tf_flops += flops
        self.by_operation[name] += flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten.convolution:
            source, weight, bias = args[0], args[1], args[2]
            transposed = args[6] if len(args) > 6 else kwargs.get("transposed", False)
            # a transposed convolution: every input element meets (out / groups) x kernel weights
            macs = source.numel() * _numel(weight.shape[1:]) if transposed else out.numel() * _numel(weight.shape[1:])
            self._add("convolution", macs, 2 * macs + (out.numel() if bias is not None else 0))
        elif packet in _MATRIX_PRODUCTS:
            left = args[_MATRIX_PRODUCTS[packet]]
            macs = max(out.numel(), 1) * left.shape[-1] if packet is not aten.addbmm else _numel(left.shape) * \
                args[2].shape[-1]
            self._add("matmul", macs, 2 * macs + (out.numel() if _MATRIX_PRODUCTS[packet] else 0))
        elif packet in _ATTENTION:
            query, key, value = args[:3]
            scores = _numel(query.shape[:-1]) * key.shape[-2]  # batch x heads x L x S
            macs = scores * (query.shape[-1] + value.shape[-1])
            self._add("attention", macs, 2 * macs + 5 * scores)
        elif func in _ELEMENTWISE:  # additions deliberately absent: see the module docstring
            self._add(str(packet.__name__), 0, _ELEMENTWISE[func] * out.numel())
        elif packet in (aten.mean, aten._adaptive_avg_pool2d):
            self._add("mean", 0, args[0].numel())
        elif packet in (aten.avg_pool2d, aten.max_pool2d, aten.max_pool2d_with_indices):
            kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
            kernel = (kernel[0], kernel[0]) if len(kernel) == 1 else kernel
            pooled = out[0] if isinstance(out, tuple) else out
            self._add("pool", 0, int(kernel[0]) * int(kernel[1]) * pooled.numel())
        else:
            self._note_uncounted(func, out)
        return out

    def _note_uncounted(self, func, out) -> None:
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        packet = func.overloadpacket
        if func.is_view or packet in _FREE or not (isinstance(first, torch.Tensor) and first.is_floating_point()):
            return
        self.uncounted[packet.__name__] += 1
        if not (torch.Tag.pointwise in func.tags or torch.Tag.reduction in func.tags or packet in _NO_MACS):
            self.uncounted_macs[packet.__name__] += 1


def _example_input(model: nn.Module, input_size: InputSize) -> torch.Tensor:
    if isinstance(input_size, int):
        shape = (3, input_size, input_size)
    elif isinstance(input_size, (tuple, list)) and len(input_size) in (2, 3):
        shape = ((3,) if len(input_size) == 2 else ()) + tuple(input_size)
    else:
        shape = None
    if shape is None or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"input_size must be a positive int, (H, W) or (C, H, W), got {input_size!r}")
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return torch.zeros((1,) + shape, device=device, dtype=dtype)


def _run_counter(model: nn.Module, input_size: InputSize) -> Tuple[OperationCounter, torch.Tensor]:
    """Run the model once at batch 1 in eval mode, counting. Grouped blocks are counted in their
    straightforward execution: the fast one's zero padding filters are an implementation detail, not work
    the method asks for."""
    counter = OperationCounter()
    was_training = model.training
    blocks = [m for m in model.modules() if isinstance(m, GroupedPointwiseConv2d)]
    executions = [block.execution for block in blocks]
    model.eval()
    try:
        for block in blocks:
            block.execution = "straightforward"
        example = _example_input(model, input_size)
        with torch.no_grad(), counter:
            output = model(example)
    except RuntimeError as error:  # e.g. a kernel larger than the feature map of a too small input
        raise ValueError(f"the model cannot run on a {tuple(example.shape[1:])} input: "
                         f"{first_line(error)}") from None
    finally:
        model.train(was_training)
        for block, execution in zip(blocks, executions):
            block.execution = execution
    return counter, output


def _warn_uncounted(function: str, operations: Dict[str, int], what: str) -> None:
    if operations:
        listed = ", ".join(f"{name} ({calls}x)" for name, calls in sorted(operations.items()))
        warnings.warn(f"gpconv.{function}: {len(operations)} operations {what} counted as zero: {listed}",
                      UserWarning, stacklevel=3)


def count_macs(model: nn.Module, input_size: InputSize) -> int:
    """Multiply-accumulates of the convolutions (transposed ones too), matrix products (linear layers)
    and attention for one image.

    ``input_size``: an int (square RGB image), ``(H, W)`` or ``(C, H, W)``. Operations that are neither
    of these nor elementwise, a norm, a reduction, pooling or softmax are counted as zero and named in
    one warning.
    """
    counter = _run_counter(model, input_size)[0]
    _warn_uncounted("count_macs", counter.uncounted_macs, "that may hold multiply-accumulates were")
    return counter.macs


def count_computations(model: nn.Module, input_size: InputSize, *, softmax_output: bool = True) -> int:
    """The papers' "computations": TensorFlow-profiler float operations at batch 1, divided by 2
    (integer division, as the authors' ``get_flops``). See the module docstring for the rules."""
    counter, output = _run_counter(model, input_size)
    _warn_uncounted("count_computations", counter.uncounted, "outside the rules (module docstring) were")
    flops = counter.tf_flops
    if softmax_output and isinstance(output, torch.Tensor) and output.dim() == 2:
        flops += 5 * output.numel()
    return flops // 2
