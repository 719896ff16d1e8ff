"""Weight transfer: fit the grouped blocks of a converted model to the dense layers they replaced.

:func:`gpconv.convert` gives every replaced 1x1 convolution (or linear layer) freshly initialised
grouped weights. A trained dense layer ``y = W x + b`` cannot be written exactly as a block's
``K + L P K`` (Entropy 2022, Eq. 26: K and L grouped, P the interleaving) -- the block has 5-15% of
the weights -- but it can be matched *on the inputs the layer really sees*. :func:`fit_to_dense`
gathers each dense layer's input statistics with forward hooks on calibration batches (the second
moment ``E[x x^T]``, or the covariance where a batch norm follows), then, per block:

1. K in closed form with L = 0: each output row of K reads only the channels of its group, so each
   row is an independent ridge-regularised least-squares problem (``k_S = M_SS^-1 M_S: w``, ``S`` the
   row's input channels); V1's output order (``PointwisePlan.output_order``) is respected;
2. L in closed form given K (each row of L likewise, on K's interleaved outputs, fitting what K missed);
3. a short joint refinement of K and L (L-BFGS) on the exact expected squared output error
   ``||S (W_block - W) R||_F^2`` with ``M = R R^T``; ``S`` weights each output by the scale of the batch
   norm that follows it (``gamma / sqrt(var + eps)``), so every channel counts as the network sees it.

Then :func:`recompute_batch_norm` re-estimates every batch norm's statistics on the calibration data.
:func:`choose_channels_per_group` picks each layer's channels per group under a parameter budget from
the same fits (the papers' stated future work). Torch only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .block import GroupedConvLayer, GroupedPointwiseConv2d, GroupedPointwiseLinear
from .convert import FIT_ERROR_ATTRIBUTE, is_plain_linear, is_plain_pointwise

__all__ = ["LayerStatistics", "LayerFit", "collect_layer_statistics", "fit_block", "fit_to_dense",
           "recompute_batch_norm", "choose_channels_per_group", "BudgetChoice", "CHANNEL_CHOICES"]

# Channels per group that choose_channels_per_group tries by default (None: the layer stays dense).
CHANNEL_CHOICES: Tuple[Optional[int], ...] = (4, 8, 16, 32, 64, None)
RIDGE = 1e-5  # ridge added to the statistics, relative to their mean diagonal (dead channels make them singular)


@dataclass
class LayerStatistics:
    """What a dense layer saw on the calibration data.

    ``moment``: ``(in + 1, in + 1)`` float64 ``E[x~ x~^T]`` with ``x~ = [x; 1]`` (its last row/column holds
    the mean); ``samples``: input vectors seen (positions x images); ``positions``: output positions per
    image (``H_out * W_out``; 1 for a linear layer on vectors); ``output_scale``: ``(out,)`` scale of the
    batch norm fed by the layer's output, or None.
    """

    moment: torch.Tensor
    samples: int
    positions: int
    output_scale: Optional[torch.Tensor] = None

    @property
    def centered(self) -> torch.Tensor:
        """``(in, in)`` covariance ``E[x x^T] - mu mu^T``."""
        mean = self.moment[:-1, -1]
        return self.moment[:-1, :-1] - torch.outer(mean, mean)


@dataclass(frozen=True)
class LayerFit:
    """One block's fit: relative output error before (its weights as they were) and after."""

    name: str
    channels_per_group: int
    initial_error: float
    relative_error: float


def _batches(calibration: Iterable):
    """Input tensors from an iterable of tensors, ``(inputs, labels)`` pairs or dicts with ``pixel_values``."""
    for batch in calibration:
        if isinstance(batch, dict):
            batch = batch.get("pixel_values", next(iter(batch.values())))
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"calibration batches must be tensors or (inputs, labels) pairs, got {type(batch).__name__}")
        yield batch


def _layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(samples, in)`` input vectors of a 1x1 convolution (stride applied) or linear layer."""
    if isinstance(module, nn.Conv2d):
        step = module.stride[0]
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return x[:, :, ::step, ::step].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _bn_scale(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    scale = 1.0 / torch.sqrt(norm.running_var.double() + norm.eps)
    return scale if norm.weight is None else scale * norm.weight.detach().double().abs()


@torch.no_grad()
def collect_layer_statistics(dense: nn.Module, calibration: Iterable, names: Sequence[str], *,
                             device: Optional[torch.device] = None) -> Dict[str, LayerStatistics]:
    """Run ``dense`` (eval mode, unchanged) on every calibration batch and gather, for each module named
    in ``names`` (1x1 ``nn.Conv2d`` or ``nn.Linear``), its :class:`LayerStatistics`. A batch norm is said to
    follow a layer when it receives that layer's output tensor itself."""
    modules = dict(dense.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"the dense model has no layer named {missing[0]!r}")
    sums: Dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in names}
    positions: Dict[str, int] = {}
    produced: Dict[int, tuple] = {}
    followers: Dict[str, nn.Module] = {}

    def record_input(name):
        def hook(module, args, output):
            x = _layer_input(module, args[0].detach()).double()
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += len(x)
            positions[name] = output[0, 0].numel() if isinstance(module, nn.Conv2d) and output.dim() == 4 else 1
            produced[id(output)] = (name, output)  # the tensor is kept so that its id is not reused
        return hook

    def record_follower(module, args):
        name, tensor = produced.get(id(args[0]), (None, None))
        if tensor is args[0] and name not in followers:
            followers[name] = module

    handles = [modules[name].register_forward_hook(record_input(name)) for name in names]
    handles += [m.register_forward_pre_hook(record_follower) for m in dense.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = dense.training
    dense.eval()
    try:
        for batch in _batches(calibration):
            produced.clear()
            dense(batch.to(device) if device is not None else batch)
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training)
    empty = [name for name in names if counts[name] == 0]
    if empty:
        raise ValueError(f"layer {empty[0]!r} saw no input on the calibration data")
    return {name: LayerStatistics(sums[name] / counts[name], counts[name], positions[name],
                                  _bn_scale(followers[name]) if name in followers else None) for name in names}


def _dense_target(layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight (out, in), bias (out,) or None)`` of a dense 1x1 convolution or linear layer, float64."""
    weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    return weight, None if layer.bias is None else layer.bias.detach().double()


def _objective(stats: LayerStatistics, has_bias: bool):
    """``(factor R, with_bias)``: the expected squared error of an output row ``d`` is ``||d R||^2``. With a
    batch norm after the layer, offsets are re-learnt by its statistics, so the covariance is used."""
    centered = stats.output_scale is not None
    moment = stats.centered if centered else (stats.moment if has_bias else stats.moment[:-1, :-1])
    ridge = RIDGE * moment.diagonal().mean().clamp_min(1e-12)
    factor = torch.linalg.cholesky(moment + ridge * torch.eye(len(moment), dtype=moment.dtype))
    return factor, has_bias and not centered


def _fit_rows(moment: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Values at ``(rows, columns)`` (a layer's weights scattered, as ``GroupedConvLayer.scattered_weight``)
    minimising ``sum_r (t_r - v_r) M (t_r - v_r)^T``, each row on its own columns (the first of repeated ones)."""
    values = torch.zeros(len(rows), dtype=moment.dtype)
    ridge = RIDGE * moment.diagonal().mean().clamp_min(1e-12)
    order = torch.argsort(rows, stable=True)
    for where in torch.split(order, torch.bincount(rows).tolist()):
        if not len(where):
            continue
        cols = columns[where]
        unique, inverse = torch.unique(cols, return_inverse=True)
        first = torch.full((len(unique),), len(cols)).scatter_reduce(0, inverse, torch.arange(len(cols)), "amin")
        where, cols = where[first], cols[first]
        system = moment[cols][:, cols] + ridge * torch.eye(len(cols), dtype=moment.dtype)
        values[where] = torch.linalg.solve(system, moment[cols] @ targets[rows[where[0]]])
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


def _closed_form(block: GroupedPointwiseConv2d, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 moment: torch.Tensor, with_bias: bool) -> None:
    """Steps 1 and 2 of the module docstring on a float64 block: K with L = 0, then L given K."""
    inputs = weight.shape[1]
    target = torch.cat([weight, bias[:, None] if bias is not None else weight.new_zeros(len(weight), 1)], 1)
    target = target if with_bias else target[:, :inputs]
    k_rows = block.k.scattered_rows
    if block.l is None and block.output_index is not None:  # output o is K's row output_index[o]
        inverse = torch.empty_like(block.output_index)
        inverse[block.output_index] = torch.arange(len(inverse))
        target = target[inverse]
    k_values, k_bias = _solve_layer(block.k, moment, target, with_bias, inputs)
    _set_layer(block.k, k_values, k_bias)
    if block.l is None:
        return
    k_dense = _augmented(block.k, with_bias, inputs)  # (out [+1], in [+1]): K's outputs (and the constant 1)
    l_moment = k_dense @ moment @ k_dense.T
    residual = target - k_dense[:len(target)]
    l_values, l_bias = _solve_layer(block.l, l_moment, _project_targets(l_moment, k_dense, moment, residual),
                                    with_bias, len(target))
    _set_layer(block.l, l_values, l_bias)


def _project_targets(l_moment, k_dense, moment, residual):
    """Row targets ``t`` for :func:`_fit_rows` on L: ``_fit_rows`` solves ``M_SS v = M_S: t``, and the
    least-squares L row needs ``M_SS v = E[z_S r]`` with ``E[z r] = K~ M r^T``; ``t = M^-1 K~ M r^T``."""
    ridge = RIDGE * l_moment.diagonal().mean()
    rhs = k_dense @ moment @ residual.T
    return torch.linalg.solve(l_moment + ridge * torch.eye(len(l_moment), dtype=l_moment.dtype), rhs).T


def _solve_layer(layer: GroupedConvLayer, moment: torch.Tensor, targets: torch.Tensor, with_bias: bool,
                 inputs: int):
    """Row-wise least squares for one layer: ``(weight values in scattered order, bias per row or None)``."""
    rows, columns = layer.scattered_rows, layer.scattered_columns
    has_bias = layer.paths[0].conv.bias is not None and with_bias
    if has_bias:  # the bias is the weight of the constant input, column ``inputs``
        out = layer.layer.out_channels
        rows = torch.cat([rows, torch.arange(out)])
        columns = torch.cat([columns, torch.full((out,), inputs, dtype=columns.dtype)])
    else:
        moment, targets = moment[:inputs, :inputs], targets[:, :inputs]
    values = _fit_rows(moment, rows, columns, targets)
    count = len(layer.scattered_rows)
    return values[:count], values[count:] if has_bias else None


def _augmented(layer: GroupedConvLayer, with_bias: bool, inputs: int) -> torch.Tensor:
    weight, bias = layer.scattered_weight()
    weight = weight[:, :, 0, 0]
    if not with_bias:
        return weight
    bias = bias if bias is not None else weight.new_zeros(len(weight))
    top = torch.cat([weight, bias[:, None]], 1)
    bottom = torch.cat([weight.new_zeros(1, inputs), weight.new_ones(1, 1)], 1)
    return torch.cat([top, bottom], 0)


def _error(block: GroupedPointwiseConv2d, weight, bias, factor, with_bias, scale) -> torch.Tensor:
    """Relative expected squared output error of ``block`` against the dense ``(weight, bias)``."""
    block_weight, block_bias = block.dense_equivalent()
    difference = block_weight[:, :, 0, 0] - weight
    reference = weight
    if with_bias:
        zeros = weight.new_zeros(len(weight), 1)
        difference = torch.cat([difference, (block_bias[:, None] if block_bias is not None else zeros)
                                - (bias[:, None] if bias is not None else zeros)], 1)
        reference = torch.cat([weight, bias[:, None] if bias is not None else zeros], 1)
    if scale is not None:
        difference, reference = difference * scale[:, None], reference * scale[:, None]
    return (difference @ factor).pow(2).sum() / (reference @ factor).pow(2).sum().clamp_min(1e-30)


def fit_block(block: GroupedPointwiseConv2d, dense: nn.Module, stats: LayerStatistics, *, steps: int = 100,
              closed_form: bool = True) -> Tuple[float, float]:
    """Fit a linear block (no batch norm or activation inside: what ``convert`` builds) to the dense 1x1
    ``nn.Conv2d`` / ``nn.Linear`` ``dense`` on ``stats`` (module docstring); in place. ``steps``: L-BFGS
    iterations of the joint refinement (0: closed form only). Returns the relative output error
    ``(before, after)``. ``ValueError`` for a block with batch norm or activation inside."""
    if block.dense_equivalent() is None:
        raise ValueError("only linear blocks (no batch norm or activation inside, as convert builds them) can be "
                         "fitted to a dense layer")
    weight, bias = _dense_target(dense)
    if tuple(weight.shape) != (block.out_channels, block.in_channels):
        raise ValueError(f"block {block.in_channels} -> {block.out_channels} does not match the dense layer "
                         f"{weight.shape[1]} -> {weight.shape[0]}")
    factor, with_bias = _objective(stats, bias is not None or _block_has_bias(block))
    moment = factor @ factor.T
    work = copy.deepcopy(block).double()
    scale = stats.output_scale
    with torch.no_grad():
        before = _error(work, weight, bias, factor, with_bias, scale).item()
        if closed_form:
            _closed_form(work, weight, bias, moment, with_bias)
    if steps:
        _refine(work, weight, bias, factor, with_bias, scale, steps)
    with torch.no_grad():
        after = _error(work, weight, bias, factor, with_bias, scale).item()
        for target, source in zip(block.parameters(), work.parameters()):
            target.copy_(source.to(target.dtype))
    setattr(block, FIT_ERROR_ATTRIBUTE, after)
    return before, after


def _block_has_bias(block: GroupedPointwiseConv2d) -> bool:
    return block.k.paths[0].conv.bias is not None


def _refine(work, weight, bias, factor, with_bias, scale, steps: int) -> None:
    """Joint L-BFGS refinement of K and L on the relative error (step 3 of the module docstring)."""
    parameters = [p for p in work.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = _error(work, weight, bias, factor, with_bias, scale)
        loss.backward()
        return loss

    optimizer.step(closure)


def _pairs(dense: nn.Module, converted: nn.Module) -> List[Tuple[str, GroupedPointwiseConv2d, nn.Module]]:
    """``(name, block, dense layer)`` for every grouped block of ``converted`` that replaced a plain 1x1
    convolution or linear layer of ``dense`` at the same name."""
    dense_modules = dict(dense.named_modules())
    pairs, seen = [], set()
    for name, module in converted.named_modules():
        if not isinstance(module, (GroupedPointwiseConv2d, GroupedPointwiseLinear)) or id(module) in seen:
            continue
        seen.add(id(module))
        block = module.block if isinstance(module, GroupedPointwiseLinear) else module
        seen.add(id(block))
        layer = dense_modules.get(name)
        if layer is None or not (is_plain_pointwise(layer) or is_plain_linear(layer)):
            raise ValueError(f"converted layer {name!r} has no dense 1x1 convolution or linear layer of that name in the "
                             "dense model: fit_to_dense needs the model convert was given")
        if block.plan.grouped:
            pairs.append((name, block, layer))
    return pairs


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, calibration: Iterable, *, device: Optional[torch.device] = None) -> int:
    """Re-estimate every batch norm's running mean and variance as plain averages over the calibration
    batches (the rest of the model in eval mode: dropout off); returns the number of batches. The
    model's training flag is restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    count = 0
    try:
        for batch in _batches(calibration):
            model(batch.to(device) if device is not None else batch)
            count += 1
    finally:
        for norm, (momentum, training) in zip(norms, saved):
            norm.momentum = momentum
            norm.train(training)
        model.train(was_training)
    return count


def fit_to_dense(dense: nn.Module, converted: nn.Module, calibration: Iterable, *, steps: int = 100,
                 batch_norm: bool = True, device: Optional[torch.device] = None,
                 progress=None) -> List[LayerFit]:
    """Fit every grouped block of ``converted`` (from ``gpconv.convert(dense, ...)``) to the dense layer it
    replaced, on the inputs that layer sees when ``dense`` runs on ``calibration`` (an iterable of input
    batches, ``(inputs, labels)`` pairs -- a ``DataLoader`` -- or dicts with ``pixel_values``); then, with
    ``batch_norm``, recompute ``converted``'s batch-norm statistics on the same batches. In place; the
    dense model is unchanged. Returns one :class:`LayerFit` per block (also shown by
    :func:`gpconv.summarize`, column "fit error"). ``calibration`` is read twice, so it must be re-iterable
    (a list or a ``DataLoader``, not a generator). ``progress``: an optional wrapper for the per-layer loop
    (``tqdm``). ``ValueError`` (one line) when ``converted`` was not converted from ``dense``."""
    if iter(calibration) is calibration:
        raise TypeError("calibration must be re-iterable (a list of batches or a DataLoader), not an iterator")
    pairs = _pairs(dense, converted)
    stats = collect_layer_statistics(dense, calibration, [name for name, _, _ in pairs], device=device)
    results = []
    for name, block, layer in (progress(pairs) if progress is not None else pairs):
        before, after = fit_block(block, layer, stats[name], steps=steps)
        results.append(LayerFit(name, block.plan.channels_per_group, before, after))
    if batch_norm:
        recompute_batch_norm(converted, calibration, device=device)
    return results


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`choose_channels_per_group` chose: ``mapping`` for ``gpconv.convert`` (layer name -> channels
    per group, None: dense), the trainable parameters it gives, the budget, and each layer's fit errors by choice."""

    mapping: Dict[str, Optional[int]]
    parameters: int
    budget_parameters: int
    dense_parameters: int
    total_error: float
    errors: Dict[str, Dict[Optional[int], float]]


def _candidate_costs(name: str, layer: nn.Module, choices, version: int, l_layer: bool):
    """``{choice: (trainable parameters of the layer, block or None)}`` for one dense layer."""
    weight = layer.weight
    out, inputs = weight.shape[0], weight.reshape(weight.shape[0], -1).shape[1]
    bias = layer.bias is not None
    dense_cost = out * inputs + (out if bias else 0)
    costs = {None: (dense_cost, None)}
    for choice in choices:
        if choice is None:
            continue
        block = GroupedPointwiseConv2d(inputs, out, choice, version=version, l_layer=l_layer, batch_norm=False,
                                       bias=bias)
        if block.plan.grouped and block.plan.parameter_count(batch_norm=False, bias=bias) < dense_cost:
            costs[choice] = (sum(p.numel() for p in block.parameters()), block)
    return costs


def choose_channels_per_group(dense: nn.Module, calibration: Iterable, budget: float, *,
                              choices: Sequence[Optional[int]] = CHANNEL_CHOICES, version: int = 2,
                              l_layer: bool = True, exclude: Sequence[str] = (), linear: bool = False,
                              steps: int = 30, progress=None) -> BudgetChoice:
    """Each pointwise layer's channels per group under a parameter budget.

    ``budget``: the converted model's trainable parameters as a fraction of ``dense``'s, in (0, 1]. Every
    plain 1x1 convolution (and with ``linear``, ``nn.Linear``) not matched by ``exclude`` (names, as in
    ``convert``) is a candidate; each choice in ``choices`` (None: dense) is fitted on the calibration
    statistics (``steps`` refinement iterations) to get its relative output error. The choice minimises
    the sum of the layers' relative errors with total parameters <= ``budget`` x dense parameters
    (a multiple-choice knapsack: Lagrangian relaxation, then greedy upgrades by error saved per
    parameter). ``ValueError`` (one line) when even the smallest choices exceed the budget.
    """
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"budget must be a fraction of the parameters in (0, 1], got {budget!r}")
    from .convert import _excluded, _patterns  # the same name matching as convert's exclude
    patterns = _patterns(exclude)
    names = [name for name, module in dense.named_modules()
             if name and (is_plain_pointwise(module) or (linear and is_plain_linear(module)))
             and not _excluded(name, patterns, set())]
    if not names:
        raise ValueError("the model has no 1x1 convolution to group")
    modules = dict(dense.named_modules())
    stats = collect_layer_statistics(dense, calibration, names)
    costs, errors = {}, {}
    for name in (progress(names) if progress is not None else names):
        costs[name] = _candidate_costs(name, modules[name], choices, version, l_layer)
        errors[name] = {choice: 0.0 if block is None else fit_block(block, modules[name], stats[name], steps=steps)[1]
                        for choice, (_, block) in costs[name].items()}
    total = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    fixed = total - sum(costs[name][None][0] for name in names)
    allowed = math.floor(budget * total) - fixed
    mapping = _knapsack({n: {c: cost for c, (cost, _) in costs[n].items()} for n in names}, errors, allowed)
    if mapping is None:
        smallest = fixed + sum(min(cost for cost, _ in costs[n].values()) for n in names)
        raise ValueError(f"budget {budget:g} ({math.floor(budget * total):,} parameters) is below the smallest "
                         f"model these choices give ({smallest:,} of {total:,})")
    chosen = fixed + sum(costs[n][mapping[n]][0] for n in names)
    return BudgetChoice(mapping, chosen, math.floor(budget * total), total,
                        sum(errors[n][mapping[n]] for n in names), errors)


def _knapsack(costs: Dict[str, Dict[Optional[int], int]], errors: Dict[str, Dict[Optional[int], float]],
              allowed: int) -> Optional[Dict[str, Optional[int]]]:
    """Minimise the summed error with summed cost <= ``allowed``; None when infeasible."""
    def pick(weight: float):
        return {n: min(costs[n], key=lambda c: (errors[n][c] + weight * costs[n][c], costs[n][c])) for n in costs}

    def cost(mapping):
        return sum(costs[n][mapping[n]] for n in mapping)

    cheapest = {n: min(costs[n], key=lambda c: (costs[n][c], errors[n][c])) for n in costs}
    if cost(cheapest) > allowed:
        return None
    low, high = 0.0, 1.0
    while cost(pick(high)) > allowed:
        high *= 2
        if high > 1e30:
            return _greedy(cheapest, costs, errors, allowed)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(pick(middle)) > allowed else (low, middle)
    return _greedy(pick(high), costs, errors, allowed)


def _greedy(mapping, costs, errors, allowed: int):
    """Upgrade layers one at a time (the largest error saved per added parameter) while the budget allows."""
    mapping = dict(mapping)
    spent = sum(costs[n][mapping[n]] for n in mapping)
    while True:
        best = None
        for name, options in costs.items():
            current = mapping[name]
            for choice, price in options.items():
                saved = errors[name][current] - errors[name][choice]
                extra = price - costs[name][current]
                if saved > 0 and spent + extra <= allowed:
                    ratio = saved / max(extra, 1)
                    if best is None or ratio > best[0]:
                        best = (ratio, name, choice, extra)
        if best is None:
            return mapping
        _, name, choice, extra = best
        mapping[name] = choice
        spent += extra
