"""gpconv.convert / gpconv.summarize on networks gpconv did not build."""

import warnings

import pytest
import torch
from torch import nn

import gpconv
from gpconv import GroupedPointwiseConv2d, make_plan


class Branchy(nn.Module):
    """Attribute children, a ModuleList of branches, a Sequential, a strided 1x1 with bias, a
    depthwise 3x3 and a dense 3x3 that must stay, and a 1x1 too small to group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 96, 1, bias=False)
        self.bn = nn.BatchNorm2d(96)
        self.depthwise = nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False)
        self.branches = nn.ModuleList([
            nn.Conv2d(96, 64, 1, stride=2, bias=True),
            nn.Sequential(nn.Conv2d(96, 48, 1), nn.ReLU(), nn.Conv2d(48, 64, 3, stride=2, padding=1)),
        ])
        self.reduce = nn.Conv2d(128, 12, 3, padding=1)
        self.tiny = nn.Conv2d(12, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = self.depthwise(self.bn(self.expand(self.stem(x))))
        x = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.head(self.tiny(self.reduce(x)))


POINTWISE = {"expand": (32, 96, False), "branches.0": (96, 64, True), "branches.1.0": (96, 48, True),
             "tiny": (12, 8, True)}


def expected_parameters(model, channels_per_group, version=2, l_layer=True, skip=()):
    """Parameter count predicted from the plans alone: each groupable 1x1 loses its dense weights
    and gains the plan's (K and L weights, and a bias per layer if it had one)."""
    total = gpconv.count_parameters(model)
    for name, (cin, cout, bias) in POINTWISE.items():
        plan = make_plan(cin, cout, channels_per_group, version=version, l_layer=l_layer)
        if plan.grouped and name not in skip:
            total += plan.parameter_count(batch_norm=False, bias=bias) - (cin * cout + (cout if bias else 0))
    return total


def modules_by_name(model):
    return dict(model.named_modules())


@pytest.mark.parametrize("version,l_layer", [(2, True), (1, True), (2, False)])
def test_convert_replaces_pointwise_only(version, l_layer):
    torch.manual_seed(0)
    model = Branchy()
    converted = gpconv.convert(model, 16, version=version, l_layer=l_layer)
    modules = modules_by_name(converted)
    for name in ("expand", "branches.0", "branches.1.0"):
        assert isinstance(modules[name], GroupedPointwiseConv2d), name
    assert type(modules["tiny"]) is nn.Conv2d  # 12 -> 8 is not worth grouping at 16 channels per group
    for name in ("stem", "depthwise", "branches.1.2"):
        assert type(modules[name]) is nn.Conv2d and modules[name] is not modules_by_name(model)[name]
    assert modules["branches.0"].stride == (2, 2)
    assert modules["branches.0"].k.paths[0].conv.bias is not None
    assert modules["expand"].k.paths[0].conv.bias is None
    assert isinstance(modules["bn"], nn.BatchNorm2d)  # the user's batch norm stays, the block adds none
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules["expand"].modules())
    assert gpconv.count_parameters(converted) == expected_parameters(model, 16, version, l_layer)
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))  # input untouched


def test_converted_model_runs_and_trains():
    torch.manual_seed(0)
    model = Branchy()
    converted = gpconv.convert(model, 4)
    assert isinstance(converted.tiny, GroupedPointwiseConv2d) and converted.branches[0].l is not None  # K and L
    x = torch.randn(2, 3, 16, 16)
    assert converted(x).shape == model(x).shape == (2, 5)
    converted(x).square().sum().backward()
    for name, parameter in converted.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_convert_keeps_dtype_device_and_mode():
    model = Branchy().double().eval()
    converted = gpconv.convert(model, 16)
    block = modules_by_name(converted)["expand"]
    assert all(p.dtype == torch.float64 for p in block.parameters())
    assert not block.training
    assert converted(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_exclude_patterns_keep_subtrees_dense_and_warn_when_unmatched():
    model = Branchy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = gpconv.convert(model, 16, exclude=["branches.*"])
    modules = modules_by_name(converted)
    assert isinstance(modules["expand"], GroupedPointwiseConv2d)
    assert type(modules["branches.0"]) is nn.Conv2d and type(modules["branches.1.0"]) is nn.Conv2d
    assert gpconv.count_parameters(converted) == expected_parameters(model, 16, skip=("branches.0", "branches.1.0"))
    converted = gpconv.convert(model, 16, exclude="branches")  # a parent's name excludes its children
    assert type(modules_by_name(converted)["branches.1.0"]) is nn.Conv2d
    with pytest.warns(UserWarning, match=r"^gpconv.convert: exclude pattern 'classifier\.\*' matches no module$"):
        gpconv.convert(model, 16, exclude=("classifier.*",))


def test_existing_grouped_blocks_and_shared_convs():
    shared = nn.Conv2d(64, 64, 1)
    model = nn.Sequential(GroupedPointwiseConv2d(8, 8, 16), shared, nn.ReLU(), shared)
    model[0].l = None
    converted = gpconv.convert(nn.Sequential(nn.Conv2d(3, 8, 1), model), 16)
    inner = converted[1][0]
    assert type(inner.k.paths[0].conv) is nn.Conv2d and inner.k.paths[0].conv.groups == 1  # not recursed into
    assert isinstance(converted[1][1], GroupedPointwiseConv2d) and converted[1][1] is converted[1][3]


def test_model_without_pointwise_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16))
    converted = gpconv.convert(model, 16)
    assert str(converted) == str(model)
    summary = gpconv.summarize(converted)
    assert summary.rows == []
    assert "no 1x1 convolutions" in str(summary)


def test_summarize_lists_replaced_layers():
    model = Branchy()
    converted = gpconv.convert(model, 16)
    summary = gpconv.summarize(converted)
    by_name = {row.name: row for row in summary.rows}
    assert set(by_name) == {"expand", "branches.0", "branches.1.0"}
    row = by_name["branches.0"]
    assert (row.in_channels, row.out_channels, row.stride) == (96, 64, 2)
    assert row.params_before == 96 * 64 + 64
    assert row.params_after == sum(p.numel() for p in modules_by_name(converted)["branches.0"].parameters())
    assert summary.params_before == gpconv.count_parameters(model)
    assert summary.model_params == gpconv.count_parameters(converted)
    assert summary.dense_pointwise == 1  # "tiny"
    text = str(summary)
    assert "branches.1.0" in text and f"{gpconv.count_parameters(model):,}" in text


def test_summarize_gpconv_model_counts_batch_norm_in_before():
    model = gpconv.create_model("mobilenet", channels_per_group=16, version=1)
    summary = gpconv.summarize(model)
    assert len(summary.rows) == 13
    dense = gpconv.create_model("mobilenet")
    assert summary.params_before == gpconv.count_parameters(dense)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(channels_per_group=0), ValueError, "channels_per_group"),
    (dict(channels_per_group="16"), TypeError, "channels_per_group"),
    (dict(version=3), ValueError, "version"),
    (dict(activation="tanh"), ValueError, "unknown activation"),
    (dict(exclude=[3]), TypeError, "exclude patterns must be strings"),
    (dict(exclude=3), TypeError, "exclude must be"),
])
def test_bad_settings_raise_one_line_errors(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        gpconv.convert(Branchy(), **kwargs)
    assert "\n" not in str(info.value)


def test_non_module_raises_type_error():
    with pytest.raises(TypeError, match="^convert expects an nn.Module, got list$"):
        gpconv.convert([nn.Conv2d(3, 3, 1)])
    with pytest.raises(TypeError, match="^summarize expects an nn.Module"):
        gpconv.summarize("resnet")


def test_torchvision_resnet():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18(num_classes=10)
    converted = gpconv.convert(model, 16, exclude=["fc"])
    assert gpconv.count_parameters(converted) < gpconv.count_parameters(model)
    assert isinstance(converted.layer2[0].downsample[0], GroupedPointwiseConv2d)
    assert converted(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_timm_mobilenetv3():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_large_100", num_classes=10)
    converted = gpconv.convert(model, 16)
    assert gpconv.summarize(converted).rows
    assert converted(torch.randn(1, 3, 64, 64)).shape == (1, 10)
