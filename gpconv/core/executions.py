"""How a grouped pointwise block's maths is executed: the one vocabulary, in training and inference.

Every word below names one way of computing the same numbers (K -> interleave -> L, summed; Eq. 26)
and no word names two. Words for a *layer* (K or L alone) and words for a *block* never coincide.

=====================  =====================================  ===========================================
word                   what runs                              where it is used
=====================  =====================================  ===========================================
**layer forms**        one grouped layer (K or L)             ``GroupedConvLayer.form``
``paths``              per path one gather and one grouped    every layer of the straightforward
                       convolution, outputs concatenated      execution
                       (Eqs. 15 and 25)
``merged``             the paths as one grouped convolution   large layers of the fast execution;
                       over one gather, then one reorder      each layer of a folded block
``scattered``          one plain convolution, the layer's     small layers of the fast execution
                       weights scattered into a dense matrix  (``LAYER_SCATTERED_MAC_RATIO``)
                       (gathers, L's interleaving folded in)
**executions**         a ``GroupedPointwiseConv2d``           ``GroupedPointwiseConv2d.execution``,
                                                              :func:`gpconv.set_execution`
``fast``               each layer merged or scattered; K's    the default (training and evaluation)
                       batch norm onwards recomputed in the
                       backward pass (``recompute``)
``straightforward``    each layer as paths, nothing           what the fast execution is tested
                       recomputed                             against (tests/test_fast.py); counting
**folded executions**  a ``FoldedGroupedPointwiseConv2d``     ``FoldedGroupedPointwiseConv2d.execution``:
                       (``GroupedPointwiseConv2d.fold()``,    :func:`gpconv.prepare_for_inference`
                       batch norms folded in)                 picks per block; ONNX export
``grouped``            K and L each one merged grouped        every folded block
                       convolution, gathers between
``factored``           K grouped, then one dense convolution  blocks with no activation inside
                       for L, the interleaving and the sum
``dense``              the whole block as one dense           blocks linear up to one final
                       convolution                            activation (``FOLDED_DENSE_MAC_RATIO``)
=====================  =====================================  ===========================================

"Reference" is not an execution: in this project it names the K-CAI code the papers' numbers came from.
"""

from __future__ import annotations

from typing import Tuple

__all__ = ["LAYER_FORMS", "EXECUTIONS", "FOLDED_EXECUTIONS", "LAYER_SCATTERED_MAC_RATIO", "FOLDED_DENSE_MAC_RATIO",
           "check_word"]

LAYER_FORMS: Tuple[str, ...] = ("paths", "merged", "scattered")
EXECUTIONS: Tuple[str, ...] = ("fast", "straightforward")
FOLDED_EXECUTIONS: Tuple[str, ...] = ("grouped", "factored", "dense")

# The two multiply-add thresholds differ because they were measured for different kernels.
# Training: in the fast execution a layer runs "scattered" when its dense matrix costs at most this many
# times its grouped multiply-adds. Measured on a layer's forward + backward pass, where the scattered
# form also saves the gathers' backward (index_add) and oneDNN's grouped backward kernels are slow on
# small layers (benchmarks/benchmark.py).
LAYER_SCATTERED_MAC_RATIO = 2.5
# Inference without an example input: a folded block with a dense form runs "dense" when that costs at
# most this many times the grouped multiply-adds. Measured on a folded block's forward pass (K and L
# together, batch norms folded): oneDNN's dense kernels are several times faster per multiply-add than
# its grouped ones there; timed with an example batch, kEffNet-B0's blocks of up to 4.5x mostly ran
# fastest dense (benchmarks/block_times.py).
FOLDED_DENSE_MAC_RATIO = 4.5


def check_word(name: str, word: str, allowed: Tuple[str, ...]) -> str:
    """``word`` if it is one of ``allowed``, else a one-line ``ValueError`` naming the valid words."""
    if word not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {word!r}")
    return word
