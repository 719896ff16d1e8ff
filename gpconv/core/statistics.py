"""What the weight transfer (:mod:`gpconv.core.fit`) measures on calibration batches: each dense
layer's input statistics, gathered with forward hooks (:func:`collect_layer_statistics`: the second
moment ``E[x x^T]``, or the covariance where a batch norm follows, and that batch norm's scale), the
converted model's own inputs for the sequential fit, and the batch-norm statistics recomputed
afterwards (:func:`recompute_batch_norm`). Torch only."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from .block import GroupedPointwiseConv2d

__all__ = ["LayerStatistics", "collect_layer_statistics", "recompute_batch_norm"]


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

        def reduced(moment: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            """``moment`` centred with the means in ``left``'s and ``right``'s last column, or cut to form."""
            if centered:
                return moment[:-1, :-1] - torch.outer(left[:-1, -1], right[:-1, -1])
            return moment if with_bias else moment[:-1, :-1]

        if self.student_moment is None and self.cross_moment is None:  # the block sees the dense layer's inputs
            moment = reduced(target, target, target)
            return moment, moment, moment  # one object: _error then needs one product, not three
        gram = target if self.student_moment is None else self.student_moment
        cross = target if self.cross_moment is None else self.cross_moment
        return reduced(gram, gram, gram), reduced(cross, gram, target), reduced(target, target, target)


def _batches(calibration: Iterable):
    """Input tensors from an iterable of tensors, ``(inputs, labels)`` pairs or dicts with ``pixel_values``."""
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an iterable of batches (a list of tensors or a DataLoader), not one "
                        "tensor: wrap it in a list")
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


class _NotCalled(ValueError):
    """The module of interest was not called when the model ran."""


def _intercept(model: nn.Module, module: nn.Module, batch: torch.Tensor, *, output: bool = False):
    """What ``module`` is first called with -- ``(args, kwargs)`` -- or, with ``output``, what it first returns,
    when ``model`` runs on ``batch`` (the rest of the model is not run)."""
    seen = []

    def before(_, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    def after(_, args, result):
        seen.append(result)
        raise _Stop

    handle = (module.register_forward_hook(after) if output
              else module.register_forward_pre_hook(before, with_kwargs=True))
    try:
        model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise _NotCalled("a converted layer saw no input on the calibration data")
    return seen[0]


def _input_of(model: nn.Module, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The first input ``module`` receives when ``model`` runs on ``batch`` (the rest is not run)."""
    return _intercept(model, module, batch)[0][0]


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
