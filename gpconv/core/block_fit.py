"""Fit one linear block to the trained dense layer it replaced (:func:`fit_block`), on that layer's
input statistics (:class:`~gpconv.core.statistics.LayerStatistics`).

A dense layer ``y = W x + b`` cannot be written exactly as a block's ``K + L P K`` (Entropy 2022,
Eq. 26: K and L grouped, P the interleaving), but it can be matched on the inputs the layer sees:

1. K in closed form with L = 0: each output row of K reads only the channels of its group, so each
   row is an independent ridge-regularised least-squares problem (``k_S = M_SS^-1 M_S: w``, ``S`` the
   row's input channels); V1's output order (``PointwisePlan.output_order``) is respected;
2. L in closed form given K (each row of L likewise, on K's interleaved outputs, fitting what K missed);
3. a short joint refinement of K and L (L-BFGS) on the exact expected squared output error
   ``||S (W_block - W) R||_F^2`` with ``M = R R^T``; ``S`` weights each output by the scale of the batch
   norm that follows it (``gamma / sqrt(var + eps)``), so every channel counts as the network sees it.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from .block import GroupedPointwiseConv2d
from .grouped_layer import GroupedConvLayer
from .rewriting import FIT_ERROR_ATTRIBUTE
from .statistics import LayerStatistics

__all__ = ["fit_block", "RIDGE"]

# ridge added to the input statistics, relative to their mean diagonal: dead channels make them singular, and
# directions the calibration data barely covers would otherwise get large weights (measured in docs/convert.md)
RIDGE = 1e-2


def _dense_target(layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight (out, in), bias (out,) or None)`` of a dense 1x1 convolution or linear layer, float64."""
    weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    return weight, None if layer.bias is None else layer.bias.detach().double()


def _ridge_scale(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge in the units of ``gram``: ``ridge`` times its mean diagonal."""
    return ridge * gram.diagonal().mean().clamp_min(1e-12)


def _ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    return _ridge_scale(gram, ridge) * torch.eye(len(gram), dtype=gram.dtype)


def _fit_rows(gram: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, rhs: torch.Tensor,
              ridge: float) -> torch.Tensor:
    """Values at ``(rows, columns)`` (a layer's weights scattered, as ``GroupedConvLayer.scattered_weight``)
    solving, row by row on the row's own columns (the first of repeated ones; the others stay 0), the
    ridge-regularised normal equations ``(G_SS + ridge) v = rhs[S, row]``. The rows with the same number
    of columns are solved as one batch (``tests/test_shrink.py`` pins it to a row-by-row loop)."""
    values = torch.zeros(len(rows), dtype=gram.dtype)
    regularised = gram + _ridge(gram, ridge)
    width = len(gram)
    pairs, inverse = torch.unique(rows * width + columns, return_inverse=True)  # sorted by row, then column
    first = torch.full((len(pairs),), len(rows)).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
    pair_rows, pair_columns = pairs // width, pairs % width
    counts = torch.bincount(pair_rows)
    starts = torch.cumsum(counts, 0) - counts
    for count in counts.unique().tolist():
        if count == 0:
            continue
        same = torch.nonzero(counts == count).flatten()
        index = starts[same, None] + torch.arange(count)  # (rows, count) positions in ``pairs``
        cols = pair_columns[index]
        systems = regularised[cols[:, :, None], cols[:, None, :]]  # (rows, count, count)
        values[first[index]] = torch.linalg.solve(systems, rhs[cols, same[:, None]])
    return values


def _set_layer(layer: GroupedConvLayer, values: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Write scattered-order weight values (and per-row biases) back into the layer's paths."""
    start = 0
    bias_start = 0
    for path in layer.paths:
        weight = path.conv.weight
        weight.copy_(values[start:start + weight.numel()].reshape(weight.shape))
        start += weight.numel()
        if path.conv.bias is not None:
            count = path.conv.bias.numel()
            path.conv.bias.copy_(bias[bias_start:bias_start + count] if bias is not None else 0)
            bias_start += count


def _solve_layer(layer: GroupedConvLayer, gram: torch.Tensor, rhs: torch.Tensor, with_bias: bool, inputs: int,
                 ridge: float):
    """Row-wise least squares for one layer: ``(weight values in scattered order, bias per row or None)``.
    ``rhs``: ``(inputs [+ 1], rows)``, the correlation of each input with each row's target."""
    rows, columns = layer.scattered_rows, layer.scattered_columns
    has_bias = layer.paths[0].conv.bias is not None and with_bias
    if has_bias:  # the bias is the weight of the constant input, column ``inputs``
        out = layer.layer.out_channels
        rows = torch.cat([rows, torch.arange(out)])
        columns = torch.cat([columns, torch.full((out,), inputs, dtype=columns.dtype)])
    else:
        gram, rhs = gram[:inputs, :inputs], rhs[:inputs]
    values = _fit_rows(gram, rows, columns, rhs, ridge)
    count = len(layer.scattered_rows)
    return values[:count], values[count:] if has_bias else None


def _augmented(layer: GroupedConvLayer, with_bias: bool, inputs: int) -> torch.Tensor:
    """The layer's dense matrix ``(out, in)``; with ``with_bias`` ``[[W, b], [0, 1]]`` acting on ``[x; 1]``."""
    weight, bias = layer.scattered_weight()
    weight = weight[:, :, 0, 0]
    if not with_bias:
        return weight
    bias = bias if bias is not None else weight.new_zeros(len(weight))
    top = torch.cat([weight, bias[:, None]], 1)
    bottom = torch.cat([weight.new_zeros(1, inputs), weight.new_ones(1, 1)], 1)
    return torch.cat([top, bottom], 0)


def _target(weight: torch.Tensor, bias: Optional[torch.Tensor], with_bias: bool) -> torch.Tensor:
    """The dense layer as ``(out, in [+ 1])``, its bias as the weight of the constant input."""
    if not with_bias:
        return weight
    return torch.cat([weight, bias[:, None] if bias is not None else weight.new_zeros(len(weight), 1)], 1)


def _closed_form(block: GroupedPointwiseConv2d, target: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                 with_bias: bool, ridge: float) -> None:
    """Steps 1 and 2 of the module docstring on a float64 block: K with L = 0, then L given K."""
    inputs = block.in_channels
    rhs = cross @ target.T  # E[s y^T]: (inputs [+ 1], out)
    if block.l is None and block.output_index is not None:  # output o is K's row output_index[o]
        inverse = torch.empty_like(block.output_index)
        inverse[block.output_index] = torch.arange(len(inverse))
        k_rhs = rhs[:, inverse]
    else:
        k_rhs = rhs
    _set_layer(block.k, *_solve_layer(block.k, gram, k_rhs, with_bias, inputs, ridge))
    if block.l is None:
        return
    k_dense = _augmented(block.k, with_bias, inputs)  # (out [+ 1], inputs [+ 1]): K's outputs (and the constant)
    l_gram = k_dense @ gram @ k_dense.T
    l_rhs = k_dense @ (rhs - gram @ k_dense[:len(target)].T)  # E[z r^T], r = y - K s: what K misses
    _set_layer(block.l, *_solve_layer(block.l, l_gram, l_rhs, with_bias, len(target), ridge))


def _error(block: GroupedPointwiseConv2d, target: torch.Tensor, moments, with_bias: bool,
           scale: Optional[torch.Tensor], ridge: float = 0.0) -> torch.Tensor:
    """Relative expected squared output error ``E||S (W~ s - W x)||^2 / E||S W x||^2`` of ``block``, plus
    ``ridge * ||S W~||_F^2`` (the refinement's regularisation, :func:`_ridge_scale`) in the numerator.
    Where the three moments are one tensor (the block sees the dense layer's own inputs) it is
    ``tr(D M D^T)`` with ``D = S (W~ - W)``: one matrix product fewer per term, and no cancellation."""
    block_weight, block_bias = block.dense_equivalent()
    estimate = _target(block_weight[:, :, 0, 0], block_bias, with_bias)
    if scale is not None:
        estimate, target = estimate * scale[:, None], target * scale[:, None]
    gram, cross, reference = moments
    energy = ((target @ reference) * target).sum()
    if gram is cross and cross is reference:
        difference = estimate - target
        squared = ((difference @ gram) * difference).sum()
    else:
        squared = ((estimate @ gram) * estimate).sum() - 2 * ((estimate @ cross) * target).sum() + energy
    if ridge:
        squared = squared + ridge * (estimate * estimate).sum()
    return squared.clamp_min(0) / energy.clamp_min(1e-30)


def fit_block(block: GroupedPointwiseConv2d, dense: nn.Module, stats: LayerStatistics, *, steps: int = 100,
              closed_form: bool = True, ridge: float = RIDGE) -> Tuple[float, float]:
    """Fit a linear block (no batch norm or activation inside: what ``convert`` builds) to the dense 1x1
    ``nn.Conv2d`` / ``nn.Linear`` ``dense`` on ``stats`` (module docstring); in place. ``steps``: L-BFGS
    iterations of the joint refinement (0: closed form only); ``ridge``: added to the input statistics,
    relative to their mean diagonal. Returns the relative output error ``(before, after)``.
    ``ValueError`` for a block with batch norm or activation inside, or of another shape."""
    if block.dense_equivalent() is None:
        raise ValueError("only linear blocks (no batch norm or activation inside, as convert builds them) can be "
                         "fitted to a dense layer")
    weight, bias = _dense_target(dense)
    if tuple(weight.shape) != (block.out_channels, block.in_channels):
        raise ValueError(f"block {block.in_channels} -> {block.out_channels} does not match the dense layer "
                         f"{weight.shape[1]} -> {weight.shape[0]}")
    centered = stats.output_scale is not None
    with_bias = not centered and (bias is not None or _block_has_bias(block))
    moments = stats.moments(centered, with_bias)
    target = _target(weight, bias, with_bias)
    work = copy.deepcopy(block).double()
    scale = stats.output_scale
    with torch.no_grad():
        before = _error(work, target, moments, with_bias, scale).item()
        if closed_form:
            _closed_form(work, target, moments[0], moments[1], with_bias, ridge)
    if steps:
        _refine(work, target, moments, with_bias, scale, steps, ridge)
    with torch.no_grad():
        after = _error(work, target, moments, with_bias, scale).item()
        for destination, source in zip(block.parameters(), work.parameters()):
            destination.copy_(source.to(destination.dtype))
    setattr(block, FIT_ERROR_ATTRIBUTE, after)
    return before, after


def _block_has_bias(block: GroupedPointwiseConv2d) -> bool:
    return block.k.paths[0].conv.bias is not None


def _refine(work, target, moments, with_bias, scale, steps: int, ridge: float) -> None:
    """Joint L-BFGS refinement of K and L on the relative error (step 3 of the module docstring), with the
    same ridge as the closed form."""
    regularisation = _ridge_scale(moments[0], ridge).item()
    parameters = [p for p in work.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = _error(work, target, moments, with_bias, scale, regularisation)
        loss.backward()
        return loss

    optimizer.step(closure)
