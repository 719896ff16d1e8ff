"""Torch-Pruning and grouped pointwise blocks: prune a model that has them without breaking them.

Torch-Pruning (Fang et al., DepGraph, CVPR 2023) removes channels together with every layer that
reads or writes them. It does not know how to remove a channel from a grouped pointwise block: the
block's plan (Entropy 2022, Eq. 7-10) is made for its channel counts, and a block with a channel
fewer is another plan with other weights. Left alone, Torch-Pruning traces into the block's grouped
convolutions and gathers, and either fails while building its graph or prunes them so that the model
fails at its first forward pass (``GroupedPointwiseConv2d expects an input of shape (N, 64, H, W),
got (1, 56, 56, 56)``).

:func:`torch_pruning_options` declares the blocks to Torch-Pruning: each block is one layer with its
own pruner (``customized_pruners``) that Torch-Pruning's tracing sees as one step from its input to
its output (``forward_fn``), and the blocks and every layer whose output channels a block reads or
writes (found on Torch-Pruning's dependency graph) are ``ignored_layers``. Pruning then removes only
channels that no block touches (a basic block's inner channels, a head), and the blocks come out
unchanged. Should a pruner be built with the blocks' pruner but without the ignored layers, the
blocks refuse, in one line, to lose a channel.

To prune and group the same model, prune first and convert the pruned model (docs/convert.md,
"Prune, then convert"). Torch-Pruning (``torch-pruning``, the ``interop`` extra) is imported only
when a function runs.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .core.block import GroupedPointwiseConv2d, GroupedPointwiseLinear

__all__ = ["prune_channels", "torch_pruning_options", "block_pruner", "opaque_blocks"]

_BLOCKS = (GroupedPointwiseConv2d, GroupedPointwiseLinear)


def _channels(block: nn.Module, side: str) -> int:
    if isinstance(block, GroupedPointwiseLinear):
        return block.in_features if side == "in" else block.out_features
    return block.in_channels if side == "in" else block.out_channels


def block_pruner() -> Any:
    """A Torch-Pruning pruning function for both kinds of blocks: it reports their channels (so the
    dependency graph treats each block as one layer) and refuses to remove any (ValueError, one line)."""
    from torch_pruning.pruner.function import BasePruningFunc

    class GroupedPointwisePruner(BasePruningFunc):
        TARGET_MODULES = _BLOCKS

        def _refuse(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise ValueError(f"{type(layer).__name__} cannot lose channels ({len(idxs)} asked): pass "
                             "**gpconv.pruning.torch_pruning_options(model, example_inputs) to the pruner, or prune "
                             "before converting")

        prune_out_channels = _refuse
        prune_in_channels = _refuse

        def get_out_channels(self, layer: nn.Module) -> int:
            return _channels(layer, "out")

        def get_in_channels(self, layer: nn.Module) -> int:
            return _channels(layer, "in")

    return GroupedPointwisePruner()


def _top_level_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of ``model``, without the convolution block inside each grouped linear layer."""
    inner = {id(module.block) for module in model.modules() if isinstance(module, GroupedPointwiseLinear)}
    return [module for module in model.modules() if isinstance(module, _BLOCKS) and id(module) not in inner]


class _OneStep(torch.autograd.Function):
    """A block's forward as one autograd node from its input to its output (for tracing only: Torch-Pruning
    reads the graph, it never runs a backward pass through it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward: Callable) -> torch.Tensor:
        return forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover - not used by tracing
        raise RuntimeError("gpconv.pruning: a traced block has no backward pass; trace under opaque_blocks only")


@contextlib.contextmanager
def opaque_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, each block of ``model`` computes its usual output as one autograd step, so
    that a graph tracer (Torch-Pruning's) sees a block as one layer; the blocks are restored after it."""
    blocks = _top_level_blocks(model)
    for block in blocks:
        block.forward = (lambda forward: lambda x: _OneStep.apply(x, forward))(block.forward)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward


def _default_forward(model: nn.Module, example_inputs: Any) -> Any:
    """Torch-Pruning's own way of calling a model on its example inputs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _opaque_forward(forward_fn: Callable) -> Callable:
    def forward(model: nn.Module, example_inputs: Any) -> Any:
        with opaque_blocks(model):
            return forward_fn(model, example_inputs)

    return forward


def torch_pruning_options(model: nn.Module, example_inputs: Any,
                          forward_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """Keyword arguments for a Torch-Pruning pruner (``tp.pruner.MetaPruner`` and its subclasses) of a
    model with grouped pointwise blocks: ``customized_pruners`` (:func:`block_pruner` for both kinds
    of blocks), ``forward_fn`` (``forward_fn``, or calling the model on the example inputs, under
    :func:`opaque_blocks`) and ``ignored_layers`` (the blocks, and each layer whose output channels
    reach a block through Torch-Pruning's dependency graph, traced on ``example_inputs``).

    ``tp.pruner.MetaPruner(model, x, importance, pruning_ratio=0.5, **torch_pruning_options(model, x))``
    then prunes only the channels no block reads or writes; the blocks stay as they are. Add your own
    ignored layers (the classifier) to the returned list.
    """
    import torch_pruning as tp

    pruner = block_pruner()
    pruners = {kind: pruner for kind in _BLOCKS}
    forward = _opaque_forward(forward_fn or _default_forward)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=forward,
                                                  customized_pruners=pruners)
    ignored: List[nn.Module] = []
    for block in _top_level_blocks(model):
        ignored.append(block)
        for handler, side in ((pruner.prune_in_channels, "in"), (pruner.prune_out_channels, "out")):
            group = graph.get_pruning_group(block, handler, list(range(_channels(block, side))))
            ignored += [dep.target.module for dep, _ in group
                        if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module)]
    unique = list({id(module): module for module in ignored}.values())
    return {"ignored_layers": unique, "customized_pruners": pruners, "forward_fn": forward}


def prune_channels(model: nn.Module, example_inputs: Any, pruning_ratio: float, *, ignored_layers: Sequence[nn.Module] = (),
                   round_to: Optional[int] = None, importance: Any = None, **pruner_options) -> nn.Module:
    """A copy of ``model`` with a fraction of its channels removed by Torch-Pruning (structured pruning:
    the layers become narrower, the parameters fewer).

    ``tp.pruner.MetaPruner`` with ``pruning_ratio`` (the fraction of each prunable layer's channels to
    remove), magnitude importance by default (``importance``: any ``tp.importance``), ``round_to``
    (channel counts kept multiples of it, e.g. the channels per group you will convert with) and one
    ``step()``. ``ignored_layers``: modules of ``model`` to keep whole, such as the classifier (its
    outputs are the classes); they are mapped onto the copy. A model with grouped pointwise blocks is
    declared with :func:`torch_pruning_options`, so its blocks come out unchanged.
    ``pruner_options`` go to the pruner. The input model is not modified.

    Prune, then convert: ``gpconv.convert(prune_channels(model, x, 0.5, ignored_layers=[head]), 16)``.
    """
    import torch_pruning as tp

    if not 0 <= pruning_ratio < 1:
        raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio!r}")
    names = {id(module): name for name, module in model.named_modules()}
    unknown = [type(module).__name__ for module in ignored_layers if id(module) not in names]
    if unknown:
        raise ValueError(f"ignored_layers must be modules of the model; {unknown[0]} is not")
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    options = torch_pruning_options(pruned, example_inputs) if _top_level_blocks(pruned) else {"ignored_layers": []}
    options["ignored_layers"] = options["ignored_layers"] + [modules[names[id(module)]] for module in ignored_layers]
    pruner = tp.pruner.MetaPruner(pruned, example_inputs, importance or tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=pruning_ratio, round_to=round_to, **options, **pruner_options)
    pruner.step()
    return pruned
