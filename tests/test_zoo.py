"""The model zoo beyond EfficientNet against the authors' figures (Mendel 2022 model zoo rows of
../shared/reference/paper_numbers.json): trainable parameters exact, computations exact."""

import pytest
import torch

import gpconv
from gpconv.experiments.paper_numbers import NOTEBOOK_OPTIONS, reference_options
from gpconv.core.block import GroupedPointwiseConv2d

from conftest import paper_rows, assert_matches_paper

ZOO = ("mobilenet", "mobilenet_v3_large", "densenet_bc_100", "inception_v3")
EXPECTED_ROW_COUNTS = {"mobilenet": 5, "mobilenet_v3_large": 12, "densenet_bc_100": 5, "inception_v3": 4}
ROWS = [row for arch in ZOO for row in paper_rows(arch)]


def row_id(row):
    return f"{row['arch']}-{row['variant']}-{row['num_classes']}cls-{row['input_size']}px"


def build(row):
    """Built on the meta device: counting needs shapes only, and is then ~10x faster on CPU (the
    counts are the same on any device; test_counting_on_meta_matches_cpu checks one)."""
    with torch.device("meta"):
        return gpconv.create_model(row["arch"], row["num_classes"], **reference_options(row["arch"], row["variant"]))


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_rows_present(arch, paper_numbers_path):
    assert len(paper_rows(arch)) == EXPECTED_ROW_COUNTS[arch]


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_zoo_row(row):
    assert_matches_paper(build(row), row)


def test_counting_on_meta_matches_cpu():
    options = dict(channels_per_group=12, version=1, transition_interleave=True)
    on_cpu = gpconv.create_model("densenet_bc_100", **options)
    with torch.device("meta"):
        on_meta = gpconv.create_model("densenet_bc_100", **options)
    assert gpconv.count_computations(on_cpu, 32) == gpconv.count_computations(on_meta, 32)
    assert gpconv.count_parameters(on_cpu) == gpconv.count_parameters(on_meta)


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_forward_and_grouping(arch):
    """Dense baselines contain no grouped block; k-variants do, and still map images to logits."""
    size = 32 if arch == "densenet_bc_100" else 75 if arch == "inception_v3" else 64
    dense = gpconv.create_model(arch, 7)
    grouped = gpconv.create_model(arch, 7, channels_per_group=16, version=1)
    assert not any(isinstance(m, GroupedPointwiseConv2d) for m in dense.modules())
    assert any(isinstance(m, GroupedPointwiseConv2d) and m.plan.grouped for m in grouped.modules())
    grouped.eval()
    with torch.no_grad():
        assert grouped(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_densenet_transition_interleave_permutes_channels():
    plain = gpconv.create_model("densenet_bc_100", channels_per_group=12, version=1)
    interleaved = gpconv.create_model("densenet_bc_100", channels_per_group=12, version=1, transition_interleave=True)
    assert gpconv.count_parameters(plain) == gpconv.count_parameters(interleaved)
    orders = [m.order.tolist() for m in interleaved.modules() if isinstance(m, gpconv.layers.ChannelInterleave)]
    assert len(orders) == 2 and orders[0][:3] == [0, 12, 24] and sorted(orders[0]) == list(range(216))


def test_inception_reference_quirks_keep_three_pointwise_dense():
    quirky = gpconv.create_model("inception_v3", channels_per_group=16, version=1)
    uniform = gpconv.create_model("inception_v3", channels_per_group=16, version=1, reference_dense_quirks=False)
    assert gpconv.count_parameters(uniform) < gpconv.count_parameters(quirky)
    assert not isinstance(quirky.mixed[2].branches["pool"][1], GroupedPointwiseConv2d)
    assert isinstance(uniform.mixed[2].branches["pool"][1], GroupedPointwiseConv2d)


def test_notebook_options_are_builder_options():
    for (arch, _), options in NOTEBOOK_OPTIONS.items():
        gpconv.create_model(arch, **options)  # raises if an option is unknown to the family


def test_unknown_family_option_is_one_line_type_error():
    with pytest.raises(TypeError, match=r"^unknown option 'transition_interleave' for mobilenet; .*$"):
        gpconv.create_model("mobilenet", transition_interleave=True)


def test_mobilenet_activation_defaults_follow_reference():
    dense = gpconv.create_model("mobilenet")
    grouped = gpconv.create_model("mobilenet", channels_per_group=16, version=1)
    assert any(isinstance(m, torch.nn.ReLU6) for m in dense.modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in dense.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in grouped.modules())
    assert isinstance(grouped.features[0][-1], torch.nn.ReLU6)  # the stem keeps ReLU6 (notebook layout)
