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

import contextlib
import copy
import math
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .block import GroupedConvLayer, GroupedPointwiseConv2d, GroupedPointwiseLinear
from .convert import FIT_ERROR_ATTRIBUTE, _excluded, _patterns, is_plain_linear, is_plain_pointwise

__all__ = ["LayerStatistics", "LayerFit", "collect_layer_statistics", "fit_block", "fit_to_dense", "convert_and_fit",
           "recompute_batch_norm", "choose_channels_per_group", "BudgetChoice", "CHANNEL_CHOICES"]

# Channels per group that choose_channels_per_group tries by default (None: the layer stays dense).
CHANNEL_CHOICES: Tuple[Optional[int], ...] = (4, 8, 16, 32, 64, None)
# ridge added to the input statistics, relative to their mean diagonal: dead channels make them singular, and
# directions the calibration data barely covers would otherwise get large weights (measured in docs/convert.md)
RIDGE = 1e-2


@dataclass
class LayerStatistics:
    """What a dense layer saw on the calibration data, float64, with ``x~ = [x; 1]`` (the last row and
    column of each moment hold the means):

    * ``moment``: ``(in + 1, in + 1)`` ``E[x~ x~^T]`` of the dense model's inputs to the layer (the target's);
    * ``student_moment`` and ``cross_moment``: ``E[s~ s~^T]`` and ``E[s~ x~^T]`` where ``s`` is what the
      block receives in the converted model, its earlier blocks already fitted (sequential fit); None:
      the block is fitted on the dense model's inputs;
    * ``samples``: input vectors seen (positions x images); ``positions``: output positions per image
      (``H_out * W_out``; 1 for a linear layer on vectors); ``output_scale``: ``(out,)`` scale of the
      batch norm fed by the layer's output, or None.
    """

    moment: torch.Tensor
    samples: int
    positions: int
    output_scale: Optional[torch.Tensor] = None
    student_moment: Optional[torch.Tensor] = None
    cross_moment: Optional[torch.Tensor] = None

    def moments(self, centered: bool, with_bias: bool):
        """``(gram E[s s^T], cross E[s x^T], target E[x x^T])``: covariances when ``centered`` (a batch norm
        follows and re-learns offsets), else second moments, with the constant input when ``with_bias``."""
        target = self.moment
        gram = target if self.student_moment is None else self.student_moment
        cross = target if self.cross_moment is None else self.cross_moment
        if centered:
            mean_t, mean_s = target[:-1, -1], gram[:-1, -1]
            return (gram[:-1, :-1] - torch.outer(mean_s, mean_s), cross[:-1, :-1] - torch.outer(mean_s, mean_t),
                    target[:-1, :-1] - torch.outer(mean_t, mean_t))
        if with_bias:
            return gram, cross, target
        return gram[:-1, :-1], cross[:-1, :-1], target[:-1, :-1]


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
    """``(samples, in + 1)`` float64 input vectors ``[x; 1]`` of a 1x1 convolution (stride applied) or
    linear layer, or of the block that replaced it."""
    stride = getattr(module, "stride", 1)
    if isinstance(module, (nn.Conv2d, GroupedPointwiseConv2d)):
        step = stride[0] if isinstance(stride, tuple) else stride
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x = x[:, :, ::step, ::step].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    else:
        x = x.reshape(-1, x.shape[-1])
    x = x.detach().double()
    return torch.cat([x, x.new_ones(len(x), 1)], 1)


def _bn_scale(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    scale = 1.0 / torch.sqrt(norm.running_var.double() + norm.eps)
    return scale if norm.weight is None else scale * norm.weight.detach().double().abs()


@torch.no_grad()
def collect_layer_statistics(dense: nn.Module, calibration: Iterable, names: Sequence[str], *,
                             device: Optional[torch.device] = None) -> Dict[str, LayerStatistics]:
    """Run ``dense`` (eval mode, unchanged) on every calibration batch and gather, for each module named
    in ``names`` (1x1 ``nn.Conv2d`` or ``nn.Linear``), its :class:`LayerStatistics` (dense inputs only). A
    batch norm is said to follow a layer when it receives that layer's output tensor itself. The result
    is in the order the layers ran."""
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
            x = _layer_input(module, args[0])
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
    with _mode(dense, train=False):
        try:
            for batch in _batches(calibration):
                produced.clear()
                dense(batch.to(device) if device is not None else batch)
        finally:
            for handle in handles:
                handle.remove()
    empty = [name for name in names if counts[name] == 0]
    if empty:
        raise ValueError(f"layer {empty[0]!r} saw no input on the calibration data")
    return {name: LayerStatistics(sums[name] / counts[name], counts[name], positions[name],
                                  _bn_scale(followers[name]) if name in followers else None) for name in sums}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has its input."""


def _input_of(model: nn.Module, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The first input ``module`` receives when ``model`` runs on ``batch`` (the rest is not run)."""
    seen = []

    def hook(_, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("a converted layer saw no input on the calibration data")
    return seen[0]


@contextlib.contextmanager
def _mode(model: nn.Module, *, train: bool, batch_norm_train: bool = False):
    """The model in eval (or train) mode, its batch norms in train mode when ``batch_norm_train``; every
    module's flag restored afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    if batch_norm_train:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


@torch.no_grad()
def _sequential_statistics(dense: nn.Module, converted: nn.Module, name: str, stats: LayerStatistics,
                           calibration: Iterable, device) -> LayerStatistics:
    """``stats`` with the student and cross moments of the converted block ``name`` (its earlier blocks as
    fitted so far; batch norms normalising with the batch's statistics, as they will once recomputed)."""
    layer, block = dense.get_submodule(name), converted.get_submodule(name)
    gram = cross = 0
    count = 0
    with _mode(dense, train=False), _mode(converted, train=False, batch_norm_train=True):
        for batch in _batches(calibration):
            batch = batch.to(device) if device is not None else batch
            x = _layer_input(layer, _input_of(dense, layer, batch))
            s = _layer_input(layer, _input_of(converted, block, batch))
            gram = gram + s.T @ s
            cross = cross + s.T @ x
            count += len(x)
    return replace(stats, student_moment=gram / count, cross_moment=cross / count)


def _dense_target(layer: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight (out, in), bias (out,) or None)`` of a dense 1x1 convolution or linear layer, float64."""
    weight = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    return weight, None if layer.bias is None else layer.bias.detach().double()


def _ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    return ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)


def _fit_rows(gram: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, rhs: torch.Tensor,
              ridge: float) -> torch.Tensor:
    """Values at ``(rows, columns)`` (a layer's weights scattered, as ``GroupedConvLayer.scattered_weight``)
    solving, row by row on the row's own columns (the first of repeated ones), the ridge-regularised
    normal equations ``(G_SS + ridge) v = rhs[S, row]``."""
    values = torch.zeros(len(rows), dtype=gram.dtype)
    regularised = gram + _ridge(gram, ridge)
    order = torch.argsort(rows, stable=True)
    for where in torch.split(order, torch.bincount(rows).tolist()):
        if not len(where):
            continue
        cols = columns[where]
        unique, inverse = torch.unique(cols, return_inverse=True)
        first = torch.full((len(unique),), len(cols)).scatter_reduce(0, inverse, torch.arange(len(cols)), "amin")
        where, cols = where[first], cols[first]
        values[where] = torch.linalg.solve(regularised[cols][:, cols], rhs[cols, rows[where[0]]])
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
           scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Relative expected squared output error ``E||S (W~ s - W x)||^2 / E||S W x||^2`` of ``block``."""
    block_weight, block_bias = block.dense_equivalent()
    estimate = _target(block_weight[:, :, 0, 0], block_bias, with_bias)
    if scale is not None:
        estimate, target = estimate * scale[:, None], target * scale[:, None]
    gram, cross, reference = moments
    energy = ((target @ reference) * target).sum()
    squared = ((estimate @ gram) * estimate).sum() - 2 * ((estimate @ cross) * target).sum() + energy
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
    gram, cross, reference = moments
    moments = (gram + _ridge(gram, ridge), cross, reference)
    parameters = [p for p in work.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = _error(work, target, moments, with_bias, scale)
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
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    count = 0
    try:
        with _mode(model, train=False, batch_norm_train=True):
            for batch in _batches(calibration):
                model(batch.to(device) if device is not None else batch)
                count += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return count


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
                    budget: Optional[float] = None, steps: int = 100, **convert_options):
    """Shrink any trained model (a transformers, timm or torchvision model; ``calibration`` a ``DataLoader``
    or a list of input batches): ``gpconv.convert`` with one ``channels_per_group`` or, with ``budget``, a
    per-layer choice (:func:`choose_channels_per_group`), then :func:`fit_to_dense`. Returns
    ``(converted model, [LayerFit, ...])``; ``dense`` is unchanged. Fine-tune the result with the dense
    model as teacher (``gpconv.experiments.training.distillation_loss``). ``convert_options``: ``version``,
    ``l_layer``, ``exclude``, ``linear`` as in ``convert``. ``ValueError`` unless exactly one of
    ``channels_per_group`` and ``budget`` is given."""
    from .convert import convert

    if (channels_per_group is None) == (budget is None):
        raise ValueError("give exactly one of channels_per_group and budget")
    if budget is not None:
        choosing = {key: value for key, value in convert_options.items() if key in ("version", "l_layer", "exclude",
                                                                                    "linear")}
        choice = choose_channels_per_group(dense, calibration, budget, steps=min(steps, 30), **choosing)
        options = {key: value for key, value in convert_options.items() if key != "exclude"}
        converted = convert(dense, choice.mapping, **options)
    else:
        converted = convert(dense, channels_per_group, **convert_options)
    return converted, fit_to_dense(dense, converted, calibration, steps=steps)


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
