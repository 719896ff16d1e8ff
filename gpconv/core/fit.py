"""Weight transfer: fit the grouped blocks of a converted model to the dense layers they replaced.

:func:`gpconv.convert` gives every replaced 1x1 convolution (or linear layer) freshly initialised
grouped weights. A trained dense layer ``y = W x + b`` cannot be written exactly as a block's
``K + L P K`` (Entropy 2022, Eq. 26: K and L grouped, P the interleaving) -- the block has 5-15% of
the weights -- but it can be matched *on the inputs the layer really sees*. :func:`fit_to_dense`
gathers each dense layer's input statistics with forward hooks on calibration batches (the second
moment ``E[x x^T]``, or the covariance where a batch norm follows; :mod:`gpconv.core.statistics`), then
fits each block (:func:`~gpconv.core.block_fit.fit_block`, whose module gives the steps): K in closed
form with L = 0, L in closed form given K, then a short joint refinement of both on the expected
squared output error.

Then :func:`recompute_batch_norm` re-estimates every batch norm's statistics on the calibration data.
:func:`choose_channels_per_group` picks each layer's channels per group under a parameter budget from
the same fits (the papers' stated future work). Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from .block import GroupedPointwiseConv2d, GroupedPointwiseLinear
from .block_fit import RIDGE, fit_block
from .budget import CHANNEL_CHOICES, BudgetChoice, choose_channels_per_group
from .convert import convert
from .reconstruction import BlockFit, default_blocks, reconstruct_blocks
from .rewriting import is_plain_linear, is_plain_pointwise
from .statistics import LayerStatistics, _sequential_statistics, collect_layer_statistics, recompute_batch_norm

# LayerStatistics, collect_layer_statistics, recompute_batch_norm (gpconv/core/statistics.py), fit_block
# (gpconv/core/block_fit.py), choose_channels_per_group, BudgetChoice, CHANNEL_CHOICES
# (gpconv/core/budget.py), reconstruct_blocks, default_blocks, BlockFit (gpconv/core/reconstruction.py):
# re-exported, their names here are public.
__all__ = ["LayerStatistics", "LayerFit", "collect_layer_statistics", "fit_block", "fit_to_dense", "convert_and_fit",
           "recompute_batch_norm", "choose_channels_per_group", "BudgetChoice", "CHANNEL_CHOICES",
           "reconstruct_blocks", "default_blocks", "BlockFit"]


@dataclass(frozen=True)
class LayerFit:
    """One block's fit: relative output error before (its weights as they were) and after."""

    name: str
    channels_per_group: int
    initial_error: float
    relative_error: float


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


def fit_to_dense(dense: nn.Module, converted: nn.Module, calibration: Iterable, *, steps: int = 100,
                 sequential: bool = False, ridge: float = RIDGE, batch_norm: bool = True,
                 device: Optional[torch.device] = None, progress=None) -> List[LayerFit]:
    """Fit every grouped block of ``converted`` (from ``gpconv.convert(dense, ...)``) to the dense layer it
    replaced, on the inputs that layer sees when ``dense`` runs on ``calibration`` (an iterable of input
    batches, ``(inputs, labels)`` pairs -- a ``DataLoader`` -- or dicts with ``pixel_values``); then, with
    ``batch_norm``, recompute ``converted``'s batch-norm statistics on the same batches. In place; the
    dense model is unchanged.

    Each block is fitted on the dense model's inputs. With ``sequential``, blocks are fitted in the order
    they run, each on the inputs it receives in ``converted`` with the blocks before it already fitted
    (batch norms on batch statistics), towards the dense layer's outputs, so that each block also
    corrects the error of those before it (one forward pass of both models per block): measured worse
    on the CIFAR-10 study's EfficientNet-B0 (docs/convert.md), hence off by default.
    ``steps``: L-BFGS iterations per block after the closed form; ``ridge``: see :func:`fit_block`.

    Returns one :class:`LayerFit` per block (also shown by :func:`gpconv.summarize`, column "fit error").
    ``calibration`` is read several times, so it must be re-iterable (a list of batches or a
    ``DataLoader``, not a generator). ``progress``: an optional wrapper for the per-block loop
    (``tqdm``). ``ValueError`` (one line) when ``converted`` was not converted from ``dense``."""
    if iter(calibration) is calibration:
        raise TypeError("calibration must be re-iterable (a list of batches or a DataLoader), not an iterator")
    pairs = {name: (block, layer) for name, block, layer in _pairs(dense, converted)}
    stats = collect_layer_statistics(dense, calibration, list(pairs), device=device)
    saved = {k: v.clone() for k, v in converted.state_dict().items() if "running_" in k or "num_batches" in k}
    results = []
    for name in (progress(list(stats)) if progress is not None else stats):
        block, layer = pairs[name]
        layer_stats = stats[name]
        if sequential:
            layer_stats = _sequential_statistics(dense, converted, name, layer_stats, calibration, device)
        before, after = fit_block(block, layer, layer_stats, steps=steps, ridge=ridge)
        results.append(LayerFit(name, block.plan.channels_per_group, before, after))
    if batch_norm:
        recompute_batch_norm(converted, calibration, device=device)
    else:
        converted.load_state_dict(saved, strict=False)
    return results


def convert_and_fit(dense: nn.Module, calibration: Iterable, channels_per_group: Optional[int] = None, *,
                    budget: Optional[float] = None, steps: int = 100, block_steps: int = 100, **convert_options):
    """Shrink any trained model (a transformers, timm or torchvision model; ``calibration`` a ``DataLoader``
    or a list of input batches): ``gpconv.convert`` with one ``channels_per_group`` or, with ``budget``, a
    per-layer choice (:func:`choose_channels_per_group`), then :func:`fit_to_dense`, then, unless
    ``block_steps`` is 0, :func:`reconstruct_blocks` with that many steps per block (its default blocks;
    call it yourself to name them or to see each block's error). Returns ``(converted model,
    [LayerFit, ...])``, the per-layer fits; ``dense`` is unchanged. Fine-tune the result with the dense
    model as teacher (``gpconv.experiments.training.distillation_loss``). ``convert_options``: ``version``,
    ``l_layer``, ``exclude``, ``linear`` as in ``convert``. ``ValueError`` unless exactly one of
    ``channels_per_group`` and ``budget`` is given."""
    if (channels_per_group is None) == (budget is None):
        raise ValueError("give exactly one of channels_per_group and budget")
    if block_steps < 0:
        raise ValueError(f"block_steps must be >= 0, got {block_steps}")
    if budget is not None:
        choosing = {key: value for key, value in convert_options.items() if key in ("version", "l_layer", "exclude",
                                                                                    "linear")}
        choice = choose_channels_per_group(dense, calibration, budget, steps=min(steps, 30), **choosing)
        options = {key: value for key, value in convert_options.items() if key != "exclude"}
        converted = convert(dense, choice.mapping, **options)
    else:
        converted = convert(dense, channels_per_group, **convert_options)
    fits = fit_to_dense(dense, converted, calibration, steps=steps)
    if block_steps:
        reconstruct_blocks(dense, converted, calibration, steps=block_steps)
    return converted, fits
