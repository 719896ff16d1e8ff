"""Each pointwise layer's channels per group under a parameter budget
(:func:`choose_channels_per_group`, the papers' stated future work): every choice fitted to the dense
layer (:func:`~gpconv.core.block_fit.fit_block`) for its relative output error, then a multiple-choice
knapsack over the layers. Torch only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

from torch import nn

from .block import GroupedPointwiseConv2d
from .block_fit import fit_block
from .convert import _excluded, _patterns
from .rewriting import is_plain_linear, is_plain_pointwise
from .statistics import collect_layer_statistics

__all__ = ["choose_channels_per_group", "BudgetChoice", "CHANNEL_CHOICES"]

# Channels per group that choose_channels_per_group tries by default (None: the layer stays dense).
CHANNEL_CHOICES: Tuple[Optional[int], ...] = (4, 8, 16, 32, 64, None)


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
