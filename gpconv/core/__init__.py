"""The layer library: depends on torch alone.

* :mod:`~gpconv.core.plan` — the torch-free :class:`PointwisePlan` (groups, paths, interleaving);
* :mod:`~gpconv.core.executions` — the words for how a block runs (layer forms, training and folded executions);
* :mod:`~gpconv.core.block` — :class:`GroupedPointwiseConv2d` (K, interleave, L, sum), its executions and ``fold()``;
* :mod:`~gpconv.core.inference` — batch norms folded, blocks folded (:func:`prepare_for_inference`);
* :mod:`~gpconv.core.convert` — replace the 1x1 convolutions of any model;
* :mod:`~gpconv.core.counting` — parameters, multiply-adds and the papers' computations.
"""
