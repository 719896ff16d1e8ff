"""Block reconstruction: after the per-layer fit, train each block of the converted model to give the dense
model's block output on the inputs the *converted* model gives it.

The per-layer fit (:func:`gpconv.core.fit.fit_to_dense`) matches every grouped layer to its dense layer on
the dense model's inputs, each on its own. Composed, the small per-layer errors compound: on the CIFAR-10
study's EfficientNet-B0 16ch (docs/results.md, "Shrinking a trained model"; mean per-layer relative error
0.066) the last block's output is 0.41-1.53 off in relative squared error on held-out images. Here each
block (an MBConv, a bottleneck: a unit of a few layers, :func:`default_blocks`), in the order the model
runs, is trained with all its parameters for a few hundred mini-batch steps of Adam on

    ``|| B_converted(s) - B_dense(x) ||^2 / || B_dense(x) ||^2``

where ``x`` is what the block receives in the dense model and ``s`` what it receives in the converted model
with the blocks before it already reconstructed, so that each block also corrects what came before it. This
is block-wise reconstruction as in post-training quantisation (BRECQ, Li et al., ICLR 2021), applied to the
grouped blocks of the kEffNet papers (Entropy 2022, Eq. 26). Batch norms use their running statistics
(eval mode) throughout, as in inference. Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from .block import GroupedPointwiseConv2d, GroupedPointwiseLinear
from .statistics import _batches, _intercept, _mode, _NotCalled

__all__ = ["BlockFit", "default_blocks", "reconstruct_blocks"]

_GROUPED = (GroupedPointwiseConv2d, GroupedPointwiseLinear)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class BlockFit:
    """One block's reconstruction: its relative output error on the calibration data before and after."""

    name: str
    initial_error: float
    relative_error: float


def _unique_grouped(module: nn.Module) -> List[nn.Module]:
    """The grouped layers of ``module``, a linear block counted once (not also its inner convolution block)."""
    inner = {id(m.block) for m in module.modules() if isinstance(m, GroupedPointwiseLinear)}
    return [m for m in module.modules() if isinstance(m, _GROUPED) and id(m) not in inner]


def default_blocks(model: nn.Module) -> List[str]:
    """The names of the blocks :func:`reconstruct_blocks` trains by default, in module order.

    Walking down from the model's children, a container (exactly ``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``) is looked into, and so is a module that holds more than half of the model's grouped
    layers (a trunk such as a transformers ``ResNetModel`` or its encoder, not a block); any other module
    holding a grouped layer is a block (an MBConv, a bottleneck, a ``Conv2dNormActivation``), and so is a
    grouped layer met on its own. Modules without grouped layers are left as they are."""
    total = len(_unique_grouped(model))
    names: List[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            held = len(_unique_grouped(child))
            if held == 0:
                continue
            if not isinstance(child, _GROUPED) and (type(child) in _CONTAINERS or 2 * held > total):
                walk(f"{prefix}{name}.", child)
            else:
                names.append(f"{prefix}{name}")

    walk("", model)
    return names


def _first_tensor(value):
    """The output tensor of a block (the first one where it returns a tuple, as transformers layers may)."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a block must return a tensor to be reconstructed, got {type(value).__name__}")
    return value


def _same(values) -> bool:
    """Whether there are several tensors and all are equal."""
    first = values[0]
    return len(values) > 1 and all(v.shape == first.shape and torch.equal(v, first) for v in values)


def _join(calls, sizes: Sequence[int], targets: Sequence[torch.Tensor]):
    """One call's arguments from per-batch ``(args, kwargs)`` (``sizes``: the batches' lengths; ``targets``:
    the dense block's outputs), each as ``(value, batched)``: a tensor with one row per sample in every batch
    is concatenated along its first dimension (``batched``); anything else -- a parameter, a tensor the same
    in every batch while the outputs differ (a mask, a position embedding), a flag -- is taken from the first
    batch."""
    outputs_differ = not _same(targets)

    def merged(values):
        first = values[0]
        batched = (not isinstance(first, nn.Parameter) and
                   all(isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == size for v, size in zip(values, sizes))
                   and not (outputs_differ and _same(values)))
        return (torch.cat([v.detach() for v in values]), True) if batched else (first, False)

    args = tuple(merged([call[0][i] for call in calls]) for i in range(len(calls[0][0])))
    kwargs = {key: merged([call[1][key] for call in calls]) for key in calls[0][1]}
    return args, kwargs


def _take(call, index: Optional[torch.Tensor]):
    """``call``'s arguments for the samples in ``index``: the batched ones indexed, the rest as they are."""
    args, kwargs = call

    def pick(item):
        value, batched = item
        return value[index] if batched else value

    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


@torch.no_grad()
def _relative_error(name: str, block: nn.Module, call, target: torch.Tensor, batch_size: int) -> float:
    error = norm = 0.0
    for start in range(0, len(target), batch_size):
        index = torch.arange(start, min(start + batch_size, len(target)), device=target.device)
        args, kwargs = _take(call, index)
        out, goal = _first_tensor(block(*args, **kwargs)), target[index]
        if out.shape != goal.shape:
            raise ValueError(f"block {name!r} gives {tuple(out.shape)} in the converted model but "
                             f"{tuple(goal.shape)} in the dense one: is that the model it was converted from?")
        error += (out - goal).double().pow(2).sum().item()
        norm += goal.double().pow(2).sum().item()
    return error / max(norm, 1e-30)


def _train(block: nn.Module, call, target: torch.Tensor, steps: int, lr: float, batch_size: int,
           generator: torch.Generator) -> None:
    parameters = [p for p in block.parameters() if p.requires_grad]
    if not parameters:
        return
    optimizer = torch.optim.Adam(parameters, lr=lr)
    with torch.enable_grad():  # also when called under torch.no_grad()
        for _ in range(steps):
            index = torch.randint(0, len(target), (min(batch_size, len(target)),), generator=generator)
            index = index.to(target.device)
            args, kwargs = _take(call, index)
            goal = target[index]
            output = _first_tensor(block(*args, **kwargs))
            loss = (output - goal).pow(2).mean() / goal.pow(2).mean().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _check_arguments(calibration, blocks, steps: int, lr: float, batch_size: int) -> None:
    """One-line errors for arguments :func:`reconstruct_blocks` cannot run with."""
    if iter(calibration) is calibration:
        raise TypeError("calibration must be re-iterable (a list of batches or a DataLoader), not an iterator")
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be a list of module names, not one string ({blocks!r}): write [{blocks!r}]")
    if blocks is not None and len(set(blocks)) != len(list(blocks)):
        raise ValueError("a block is named twice in blocks")
    if steps < 0 or batch_size < 1 or not lr >= 0:
        raise ValueError(f"steps must be >= 0, batch_size >= 1 and lr >= 0 (got {steps}, {batch_size}, {lr})")


def reconstruct_blocks(dense: nn.Module, converted: nn.Module, calibration: Iterable, *,
                       blocks: Optional[Sequence[str]] = None, steps: int = 100, lr: float = 1e-3,
                       batch_size: int = 128, seed: int = 0, device: Optional[torch.device] = None,
                       progress=None) -> List[BlockFit]:
    """Train each block of ``converted`` (from ``gpconv.convert(dense, ...)``, usually already fitted by
    ``fit_to_dense``) to give ``dense``'s output of the same block, on the inputs it receives in ``converted``
    (module docstring). In place; ``dense`` is unchanged; both run in eval mode.

    ``calibration``: a re-iterable of input batches (tensors, ``(inputs, labels)`` pairs or dicts with
    ``pixel_values``, as in ``fit_to_dense``); every block's inputs and targets for all of it are held in
    memory at once. ``blocks``: module names present in both models, run in the order given (default:
    :func:`default_blocks`; in the order the model runs them, or a block is trained on inputs from before the
    blocks ahead of it were). A block called more than once in a forward pass is trained on its first call.
    ``steps`` Adam steps of ``batch_size`` calibration samples drawn with ``seed``
    at learning rate ``lr`` per block; a block whose error did not fall keeps its weights as they were.
    Returns one :class:`BlockFit` per block. ``ValueError`` (one line) for empty calibration data, a block
    name missing from either model or named twice, a block not run on the calibration data, a block whose
    output shape differs between the models, or a negative ``steps``, ``lr`` or ``batch_size`` below 1;
    ``TypeError`` for an iterator as ``calibration``, one string as ``blocks`` or a block that returns no
    tensor."""
    _check_arguments(calibration, blocks, steps, lr, batch_size)
    names = default_blocks(converted) if blocks is None else list(blocks)
    dense_modules, converted_modules = dict(dense.named_modules()), dict(converted.named_modules())
    missing = [name for name in names if name not in dense_modules or name not in converted_modules]
    if missing:
        raise ValueError(f"no block named {missing[0]!r} in both the dense and the converted model")
    generator = torch.Generator().manual_seed(seed)
    batches = [batch.to(device) if device is not None else batch for batch in _batches(calibration)]
    if not batches:
        raise ValueError("the calibration data is empty")
    results = []
    with _mode(dense, train=False), _mode(converted, train=False):
        for name in (progress(names) if progress is not None else names):
            block = converted_modules[name]
            try:
                with torch.no_grad():
                    targets = [_first_tensor(_intercept(dense, dense_modules[name], batch, output=True)).detach()
                               for batch in batches]
                    call = _join([_intercept(converted, block, batch) for batch in batches], [len(b) for b in batches],
                                 targets)
                    target = torch.cat(targets)
            except _NotCalled:
                raise ValueError(f"block {name!r} was not run on the calibration data") from None
            before = _relative_error(name, block, call, target, batch_size)
            saved = {key: value.clone() for key, value in block.state_dict().items()}
            _train(block, call, target, steps, lr, batch_size, generator)
            after = _relative_error(name, block, call, target, batch_size)
            if not after < before:
                block.load_state_dict(saved)
                after = before
            results.append(BlockFit(name, before, after))
    return results
