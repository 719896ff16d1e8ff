"""How an inference form is timed: a :data:`Timer` gives the seconds a module takes on an input.

:func:`torch_seconds` (the default) times in torch; :func:`gpconv.export.runtime_timer` times in ONNX
Runtime or OpenVINO instead. :meth:`gpconv.core.folded.FoldedGroupedPointwiseConv2d.tune` and
:func:`gpconv.core.folded.choose_executions` keep the fastest form by it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

__all__ = ["Timer", "torch_seconds"]

# How a form is timed: (module, an input like the ones to come) -> seconds (torch_seconds, or a runtime's).
Timer = Callable[[nn.Module, torch.Tensor], float]


def _seconds(function, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up call (oneDNN primitive creation)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def torch_seconds(module: nn.Module, x: torch.Tensor) -> float:
    """The default :data:`Timer`: seconds of ``module(x)`` in torch (:func:`_seconds`); on a GPU up to the
    end of its kernels (CUDA calls return before they run)."""
    if x.is_cuda:
        return _seconds(lambda: (module(x), torch.cuda.synchronize(x.device)))
    return _seconds(lambda: module(x))
