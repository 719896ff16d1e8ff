"""The layer library: depends on torch alone.

* :mod:`~gpconv.core.plan` — the torch-free :class:`PointwisePlan` (groups, paths, interleaving);
* :mod:`~gpconv.core.executions` — the words for how a block runs (layer forms, training and folded executions);
* :mod:`~gpconv.core.timing` — how an inference form is timed;
* :mod:`~gpconv.core.folded` — :class:`FoldedGroupedPointwiseConv2d`, a block's inference form, and its choice;
* :mod:`~gpconv.core.grouped_layer` — :class:`GroupedConvLayer`, layer K or L in its three forms;
* :mod:`~gpconv.core.block` — :class:`GroupedPointwiseConv2d` (K, interleave, L, sum), its executions and ``fold()``;
* :mod:`~gpconv.core.rewriting` — what the model rewrites share (plain pointwise layers, the copy, kept layers);
* :mod:`~gpconv.core.summary` — :func:`summarize`, a model's grouped layers before and after;
* :mod:`~gpconv.core.inference` — batch norms folded, blocks folded (:func:`prepare_for_inference`);
* :mod:`~gpconv.core.convert` — replace the 1x1 convolutions of any model;
* :mod:`~gpconv.core.counting` — parameters, multiply-adds and the papers' computations;
* :mod:`~gpconv.core.statistics`, :mod:`~gpconv.core.block_fit`, :mod:`~gpconv.core.budget`,
  :mod:`~gpconv.core.reconstruction`, :mod:`~gpconv.core.fit` — the weight transfer: calibration statistics,
  one block's fit (Eq. 26), the channels per group under a budget, block reconstruction, :func:`fit_to_dense`.

Each module imports only the ones above it in this list (and ``gpconv/layers.py`` after the executions):
docs/architecture.md, "Import order in the core".
"""
