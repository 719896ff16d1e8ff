"""The grouping plan against Entropy 2022, Table 1, and the papers' equations."""

import pytest
from hypothesis import given, settings, strategies as st

from gpconv import make_plan
from gpconv.core.plan import PLAN_VERSIONS, interleave_permutation

# Entropy 2022, Table 1: Ic, F, Ch -> G_K1, Fg_K1, G_K2, G_L1, Fg_L1, G_L2, total weights.
TABLE_1 = [
    (14, 10, 4, 4, 2, 2, 3, 3, 1, 80),
    (160, 3840, 16, 10, 384, 0, 0, 0, 0, 61_440),
    (160, 3840, 32, 5, 768, 0, 0, 0, 0, 122_880),
    (192, 1152, 16, 12, 96, 0, 0, 0, 0, 18_432),
    (192, 1152, 32, 6, 192, 0, 0, 0, 0, 36_864),
    (1152, 320, 16, 72, 4, 32, 20, 16, 0, 10_240),
    (1152, 320, 32, 36, 8, 32, 10, 32, 0, 20_480),
    (3840, 640, 16, 240, 2, 160, 40, 16, 0, 20_480),
    (3840, 640, 32, 120, 5, 40, 20, 32, 0, 40_960),
]


@pytest.mark.parametrize("ic,f,ch,g_k1,fg_k1,g_k2,g_l1,fg_l1,g_l2,total", TABLE_1)
def test_entropy_table_1(ic, f, ch, g_k1, fg_k1, g_k2, g_l1, fg_l1, g_l2, total):
    row = make_plan(ic, f, ch).table_row()
    assert (row["G_K1"], row["Fg_K1"], row["G_K2"]) == (g_k1, fg_k1, g_k2)
    assert (row["G_L1"], row["Fg_L1"], row["G_L2"]) == (g_l1, fg_l1, g_l2)
    assert row["total"] == total


def test_figure_1_example_channel_sets():
    """14 -> 10, Ch=4: the last K1 group reads x13, x14, x1, x2 (Eq. 10, 1-based in the paper)."""
    plan = make_plan(14, 10, 4)
    k1, k2 = plan.k.paths
    assert k1.input_index[12:16] == (12, 13, 0, 1)
    assert plan.k.replicated_channels == (0, 1)
    assert k2.input_index == tuple(range(8))  # the extra filters reuse the first groups (Eq. 14)
    assert plan.interleave == (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Eq. 16: odd channels first
    assert "K2: 2 groups" in str(plan)


def test_interleave_is_the_references_step_interleave():
    assert interleave_permutation(6, 3) == (0, 3, 1, 4, 2, 5)
    assert interleave_permutation(5, 1) is None


def test_small_layers_stay_dense():
    assert not make_plan(32, 8, 16).grouped  # 32 <= 2 * 16 and not an expansion
    assert make_plan(17, 96, 16).grouped  # expansion with more than Ch inputs is grouped
    assert not make_plan(16, 96, 16).grouped


def test_version_1_uses_largest_common_divisor():
    plan = make_plan(96, 24, 16, version=1)
    assert plan.k.paths[0].groups == 6 and plan.l.paths[0].groups == 6
    assert plan.interleave == interleave_permutation(24, 4)
    expansion = make_plan(24, 144, 8, version=1)
    assert expansion.l is None and expansion.output_order == interleave_permutation(144, 48)
    assert make_plan(24, 144, 8, version=1, l_layer=False).output_order is None
    assert not make_plan(17, 13, 4, version=1).grouped  # no common divisor > 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 40), st.sampled_from(PLAN_VERSIONS), st.booleans())
def test_plan_invariants(ic, f, ch, version, l_layer):
    plan = make_plan(ic, f, ch, version=version, l_layer=l_layer)
    for layer in (plan.k, plan.l):
        if layer is None:
            continue
        # Eq. 27: the paths of a layer produce exactly F filters.
        assert sum(path.out_channels for path in layer.paths) == f
        for path in layer.paths:
            assert len(path.input_index) == path.groups * path.channels_per_group
            assert all(0 <= index < layer.in_channels for index in path.input_index)
        # every input channel is read by the main path
        assert set(layer.paths[0].input_index) == set(range(layer.in_channels))
    if plan.interleave is not None:
        assert sorted(plan.interleave) == list(range(f))
    if plan.l is not None:
        assert l_layer and ic >= f and plan.grouped
    assert plan.weight_count == sum(p.weight_count for layer in (plan.k, plan.l) if layer for p in layer.paths)


@pytest.mark.parametrize("value,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("16", TypeError),
                                         (True, TypeError), (None, TypeError)])
def test_bad_channels_per_group(value, error):
    with pytest.raises(error, match="channels_per_group"):
        make_plan(64, 64, value)


@pytest.mark.parametrize("ic,f,name", [(0, 8, "in_channels"), (8, 0, "out_channels"), (8, -1, "out_channels")])
def test_bad_channel_counts(ic, f, name):
    with pytest.raises(ValueError, match=name):
        make_plan(ic, f, 4)


def test_bad_version():
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        make_plan(64, 64, 8, version=3)


def test_plan_versions_are_every_version_choice():
    """PLAN_VERSIONS is the one list of versions: make_plan, the CLI's --version, variant names and
    sweep templates accept exactly these."""
    from gpconv.cli import build_parser
    from gpconv.experiments.paper_numbers import parse_variant
    from gpconv.experiments.sweep import expand_variants

    assert PLAN_VERSIONS == (1, 2)
    for version in PLAN_VERSIONS:
        assert make_plan(64, 64, 8, version=version).version == version
        assert parse_variant(f"v{version}-16ch-noL").version == version
        assert expand_variants([f"v{version}-relu"], [8]) == [f"v{version}-8ch-relu"]
        assert build_parser().parse_args(["plan", "64", "64", "--channels-per-group", "8",
                                          "--version", str(version)]).version == version
    with pytest.raises(ValueError, match="unknown variant 'v3-16ch'"):
        parse_variant("v3-16ch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "64", "64", "--channels-per-group", "8", "--version", "3"])


def test_plan_layers_are_k_then_l():
    for plan in (make_plan(14, 10, 4), make_plan(32, 192, 16), make_plan(64, 64, 8, l_layer=False)):
        assert plan.layers == ((plan.k,) if plan.l is None else (plan.k, plan.l))
        assert plan.weight_count == sum(layer.weight_count for layer in plan.layers)
