"""Grouping plans: the integer arithmetic of the papers, with no torch in sight.

A :class:`PointwisePlan` describes how one dense 1x1 convolution (``in_channels`` -> ``out_channels``)
is replaced by the papers' sub-architecture: a grouped layer K, an interleaving, a grouped layer L and
a sum (``output = K + L(interleave(K))``). :class:`~gpconv.core.block.GroupedPointwiseConv2d` executes a
plan; users can build and print plans without building any module::

    >>> from gpconv import make_plan
    >>> print(make_plan(14, 10, channels_per_group=4))        # Entropy 2022, Table 1, first row

Two versions follow the reference implementation (K-CAI), which produced the papers' numbers:

* ``version=1`` -- Mendel 2022 (the reference's ``kConv2DType2``; ``kConv2DType3`` when ``l_layer=False``).
* ``version=2`` -- Entropy 2022 (the reference's ``kConv2DType10`` built from ``kGroupConv2D``; with
  ``l_layer=False`` the reference's "never intergroup" variant used for the "no L" rows).

Where the papers' text and the reference code differ, the plan follows the code (see ``docs/method.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = [
    "PLAN_VERSIONS",
    "ConvPath",
    "LayerPlan",
    "PointwisePlan",
    "make_plan",
    "dense_plan",
    "interleave_permutation",
    "check_positive_int",
]

Index = Tuple[int, ...]

# The plan versions ``make_plan`` builds (module docstring); the CLI's ``--version`` choices and the
# variant names (``v1-16ch``, ``v2-8ch-noL``, ...) are made from this.
PLAN_VERSIONS: Tuple[int, ...] = (1, 2)


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    """Raise a one-line ``TypeError``/``ValueError`` unless ``value`` is an int >= 1."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "an int >= 1 or None" if allow_none else "an int >= 1"
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def interleave_permutation(channels: int, step: int) -> Optional[Index]:
    """Channel order after interleaving with ``step`` (the reference's ``InterleaveChannels``).

    Position ``p`` of the result holds channel ``perm[p]``: first channels ``0, step, 2*step, ...``,
    then ``1, 1+step, ...`` and so on. With ``step == 2`` this is Entropy 2022 Eq. (16) (odd channels
    first, then even ones, counting from 1). Returns ``None`` when ``step < 2`` (no interleaving).
    """
    if step < 2:
        return None
    return tuple(c for start in range(step) for c in range(start, channels, step))


@dataclass(frozen=True)
class ConvPath:
    """One grouped 1x1 convolution path (K1, K2, L1 or L2 in Entropy 2022, Fig. 1).

    ``groups`` groups of ``filters_per_group`` filters each read ``channels_per_group`` channels.
    The path's input is the layer input gathered by ``input_index``: group ``g`` reads channels
    ``input_index[g * channels_per_group:(g + 1) * channels_per_group]`` (Eqs. 9-10 and 19-20:
    consecutive channels, the last group completed by replicating the first ones).
    """

    groups: int
    channels_per_group: int
    filters_per_group: int
    input_index: Index

    @property
    def in_channels(self) -> int:
        """Number of gathered input channels (``groups * channels_per_group``)."""
        return len(self.input_index)

    @property
    def out_channels(self) -> int:
        return self.groups * self.filters_per_group

    @property
    def weight_count(self) -> int:
        """Convolution weights of this path: filters times channels per filter (Eq. 6)."""
        return self.out_channels * self.channels_per_group

    def reads_unchanged(self, layer_in_channels: int) -> bool:
        """True when the path reads its layer's input as it is (no gather, no replication)."""
        return self.input_index == tuple(range(layer_in_channels))


@dataclass(frozen=True)
class LayerPlan:
    """Layer K or L: one or two paths whose outputs are concatenated (Eqs. 15 and 25)."""

    in_channels: int
    out_channels: int
    paths: Tuple[ConvPath, ...]

    @property
    def grouped(self) -> bool:
        return self.paths[0].groups > 1

    @property
    def weight_count(self) -> int:
        return sum(path.weight_count for path in self.paths)

    @property
    def replicated_channels(self) -> Index:
        """Input channels read a second time to fill the last group of the main path (Eq. 10)."""
        main = self.paths[0]
        return main.input_index[self.in_channels:]

    def summary(self) -> Tuple[int, int, int]:
        """``(G1, Fg1, G2)`` as in Entropy 2022, Table 1 (``G2`` is 0 when there is no second path)."""
        main = self.paths[0]
        second = self.paths[1].groups if len(self.paths) > 1 else 0
        return main.groups, main.filters_per_group, second


@dataclass(frozen=True)
class PointwisePlan:
    """How one dense ``in_channels -> out_channels`` 1x1 convolution is replaced.

    Execution (``GroupedPointwiseConv2d``): ``k = K(x)``; if ``l`` is set,
    ``output = L(k[:, interleave]) + k`` (Eq. 26); otherwise ``output = k[:, output_order]`` when
    ``output_order`` is set (version 1 expansion layers: the reference keeps K's interleaved order)
    or ``k`` itself. Each path is conv -> batch norm -> activation.
    """

    in_channels: int
    out_channels: int
    channels_per_group: Optional[int]
    version: int
    l_layer: bool
    k: LayerPlan
    l: Optional[LayerPlan] = None
    interleave: Optional[Index] = None
    output_order: Optional[Index] = None

    @property
    def grouped(self) -> bool:
        """False when the layer stays a dense 1x1 convolution."""
        return self.k.grouped

    @property
    def layers(self) -> Tuple[LayerPlan, ...]:
        """K, then L where there is one."""
        return (self.k,) if self.l is None else (self.k, self.l)

    @property
    def weight_count(self) -> int:
        """Convolution weights of K and L (Entropy 2022, Table 1 "K+L Params"; Eq. 28)."""
        return sum(layer.weight_count for layer in self.layers)

    @property
    def dense_weight_count(self) -> int:
        """Weights of the dense 1x1 convolution this plan replaces (Eq. 3)."""
        return self.in_channels * self.out_channels

    def parameter_count(self, *, batch_norm: bool = True, bias: bool = False) -> int:
        """Trainable parameters of the executing module: weights, plus per output channel of each
        layer a bias (if ``bias``) and a batch-norm scale and shift (if ``batch_norm``)."""
        per_channel = (2 if batch_norm else 0) + (1 if bias else 0)
        return self.weight_count + len(self.layers) * self.out_channels * per_channel

    def table_row(self) -> dict:
        """The row of Entropy 2022 Table 1 for this layer."""
        g_k1, fg_k1, g_k2 = self.k.summary()
        g_l1, fg_l1, g_l2 = self.l.summary() if self.l is not None else (0, 0, 0)
        dense = self.dense_weight_count
        return {
            "Ic": self.in_channels, "F": self.out_channels, "P": dense, "Ch": self.channels_per_group,
            "G_K1": g_k1, "Fg_K1": fg_k1, "G_K2": g_k2, "G_L1": g_l1, "Fg_L1": fg_l1, "G_L2": g_l2,
            "total": self.weight_count, "percent": 100.0 * self.weight_count / dense,
        }

    def describe(self) -> str:
        """A readable multi-line description (what ``print(plan)`` shows)."""
        head = (f"{self.in_channels} -> {self.out_channels} pointwise, "
                f"channels_per_group={self.channels_per_group}, version={self.version}")
        if not self.grouped:
            return (f"{head}: stays dense ({self.dense_weight_count:,} weights)")
        lines = [head + ":"]
        for name, layer in zip("KL", self.layers):
            for number, path in enumerate(layer.paths, start=1):
                lines.append(
                    f"  {name}{number}: {path.groups} groups x {path.filters_per_group} filters, "
                    f"{path.channels_per_group} channels per group, {path.weight_count:,} weights")
            if layer.replicated_channels:
                lines.append(f"  {name}: replicated input channels {_short(layer.replicated_channels)}")
            if name == "K" and self.interleave is not None:
                lines.append(f"  interleave: {_short(self.interleave)}")
        if self.output_order is not None:
            lines.append(f"  output order (interleaved K): {_short(self.output_order)}")
        lines.append(f"  weights: {self.weight_count:,} of {self.dense_weight_count:,} "
                     f"({100.0 * self.weight_count / self.dense_weight_count:.2f}%)")
        return "\n".join(lines)

    __str__ = describe


def _short(index: Index, limit: int = 12) -> str:
    if len(index) <= limit:
        return "[" + ", ".join(map(str, index)) + "]"
    return "[" + ", ".join(map(str, index[:limit])) + f", ... ({len(index)} channels)]"


def _dense_layer(in_channels: int, out_channels: int) -> LayerPlan:
    path = ConvPath(1, in_channels, out_channels, tuple(range(in_channels)))
    return LayerPlan(in_channels, out_channels, (path,))


def dense_plan(in_channels: int, out_channels: int, channels_per_group: Optional[int] = None,
               version: int = 2, l_layer: bool = True) -> PointwisePlan:
    """The plan of a layer that stays a dense 1x1 convolution."""
    return PointwisePlan(in_channels, out_channels, channels_per_group, version, l_layer,
                         k=_dense_layer(in_channels, out_channels))


def _wrapped(count: int, channels: int) -> Index:
    """Channels ``0..count-1`` of an input with ``channels`` channels, wrapping around: the
    reference fills missing channels by copying the first ones (``FitChannelCountTo``)."""
    return tuple(index % channels for index in range(count))


def _group_layer_v2(in_channels: int, filters: int, channels_per_group: int) -> LayerPlan:
    """One grouped layer of version 2 (the reference's ``kGroupConv2D``; Eqs. 7-15 and 17-25).

    Groups: ``ceil(in / Ch)`` (Eq. 7), at most one per filter. Filters per group: ``floor(F / G)``
    (Eq. 11); the ``F mod G`` leftover filters form a second path of one-filter groups reading the
    first groups' channels (Eqs. 13-14). When the groups were capped by the filter count, each group
    reads ``ceil(in / G)`` channels instead of ``Ch`` (the reference's only exception).
    """
    groups = min(math.ceil(in_channels / channels_per_group), filters)
    if groups <= 1:
        return _dense_layer(in_channels, filters)
    per_group = channels_per_group
    if groups * channels_per_group < in_channels:
        per_group = math.ceil(in_channels / groups)
    gathered = _wrapped(groups * per_group, in_channels)
    filters_per_group, leftover = divmod(filters, groups)
    paths = [ConvPath(groups, per_group, filters_per_group, gathered)]
    if leftover:
        paths.append(ConvPath(leftover, per_group, 1, gathered[:leftover * per_group]))
    return LayerPlan(in_channels, filters, tuple(paths))


def _plan_v2(in_channels: int, out_channels: int, channels_per_group: int, l_layer: bool) -> PointwisePlan:
    expansion = out_channels > in_channels
    worth_grouping = (in_channels > 2 * channels_per_group
                      or (expansion and in_channels > channels_per_group))
    if not worth_grouping:
        return dense_plan(in_channels, out_channels, channels_per_group, 2, l_layer)
    k = _group_layer_v2(in_channels, out_channels, channels_per_group)
    plan = PointwisePlan(in_channels, out_channels, channels_per_group, 2, l_layer, k=k)
    if not (k.grouped and l_layer and in_channels >= out_channels):
        return plan
    # Interleave step: F // Ch in the reference (the paper's Eq. 16 describes step 2).
    interleave = interleave_permutation(out_channels, out_channels // channels_per_group)
    l = _group_layer_v2(out_channels, out_channels, channels_per_group)
    return PointwisePlan(in_channels, out_channels, channels_per_group, 2, l_layer,
                         k=k, l=l, interleave=interleave)


def _largest_common_divisor_at_most(a: int, b: int, limit: int) -> int:
    """The largest common divisor of ``a`` and ``b`` that is <= ``limit`` (at least 1)."""
    for divisor in range(max(1, min(a, b, limit)), 0, -1):
        if a % divisor == 0 and b % divisor == 0:
            return divisor
    return 1


def _plan_v1(in_channels: int, out_channels: int, channels_per_group: int, l_layer: bool) -> PointwisePlan:
    """Version 1 (Mendel 2022): groups = the largest common divisor of in and out that leaves each
    group at least ``channels_per_group`` input channels; no replication, no second path."""
    groups = _largest_common_divisor_at_most(in_channels, out_channels, in_channels // channels_per_group)
    if groups <= 1:
        return dense_plan(in_channels, out_channels, channels_per_group, 1, l_layer)
    identity = tuple(range(in_channels))
    k = LayerPlan(in_channels, out_channels,
                  (ConvPath(groups, in_channels // groups, out_channels // groups, identity),))
    if not l_layer:  # the reference's kConv2DType3: grouped K only, no interleaving
        return PointwisePlan(in_channels, out_channels, channels_per_group, 1, False, k=k)
    interleave = interleave_permutation(out_channels, out_channels // groups)
    if in_channels < out_channels:
        # Expansion: no L, but the reference still returns K's output interleaved.
        return PointwisePlan(in_channels, out_channels, channels_per_group, 1, True, k=k,
                             output_order=interleave)
    l = LayerPlan(out_channels, out_channels,
                  (ConvPath(groups, out_channels // groups, out_channels // groups,
                            tuple(range(out_channels))),))
    return PointwisePlan(in_channels, out_channels, channels_per_group, 1, True,
                         k=k, l=l, interleave=interleave)


_PLAN_BUILDERS = {1: _plan_v1, 2: _plan_v2}  # one per PLAN_VERSIONS


def make_plan(in_channels: int, out_channels: int, channels_per_group: int, *,
              version: int = 2, l_layer: bool = True) -> PointwisePlan:
    """Plan the replacement of a dense ``in_channels -> out_channels`` 1x1 convolution.

    ``channels_per_group`` is the papers' ``Ch``. ``l_layer=False`` is the "no L" ablation (K only,
    no interleaving). Layers too small to be worth grouping stay dense, as in the reference.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    check_positive_int("channels_per_group", channels_per_group)
    if isinstance(version, bool) or version not in PLAN_VERSIONS:
        raise ValueError(f"version must be {' or '.join(map(str, PLAN_VERSIONS))}, got {version!r}")
    if not isinstance(l_layer, bool):
        raise TypeError(f"l_layer must be True or False, got {l_layer!r}")
    return _PLAN_BUILDERS[version](in_channels, out_channels, channels_per_group, l_layer)
