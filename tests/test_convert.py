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


BLOCK_SETTINGS = [dict(version=2), dict(version=1), dict(version=2, l_layer=False), dict(version=1, l_layer=False)]


@pytest.mark.parametrize("settings", BLOCK_SETTINGS)
@pytest.mark.parametrize("shape", [(96, 40, 2, True), (24, 80, 1, False)])
def test_block_answers_like_the_convolution_it_replaces(settings, shape):
    cin, cout, stride, bias = shape
    conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)
    block = GroupedPointwiseConv2d(cin, cout, 4, batch_norm=False, bias=bias, stride=stride, **settings).double()
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
                 "groups"):
        assert getattr(block, name) == getattr(conv, name), name
    assert block.weight.shape == conv.weight.shape and block.weight.dtype == torch.float64
    assert (block.bias is None) == (conv.bias is None)
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), nn.functional.conv2d(x, block.weight, block.bias, stride))


def probed_linear_map(layer, features):
    """Weight and bias of a linear map, read from its outputs on 0 and on the unit vectors."""
    with torch.no_grad():
        bias = layer(torch.zeros(features, dtype=torch.float64))
        columns = layer(torch.eye(features, dtype=torch.float64)) - bias
    return columns.T, bias


@pytest.mark.parametrize("settings", BLOCK_SETTINGS)
def test_grouped_linear_equals_a_dense_linear_with_the_block_weight(settings):
    torch.manual_seed(0)
    layer = gpconv.GroupedPointwiseLinear(48, 20, 8, **settings).double()
    weight, bias = probed_linear_map(layer, 48)
    torch.testing.assert_close(layer.weight, weight)
    torch.testing.assert_close(layer.bias, bias)
    if not settings.get("l_layer", True):  # K alone: exactly the plan's weights, the rest zero
        assert int((weight != 0).sum()) == layer.plan.weight_count < 48 * 20
    dense = nn.Linear(48, 20).double()
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    x = torch.randn(3, 5, 7, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))
    assert layer(x[0, 0, 0]).shape == (20,)


def test_block_with_batch_norm_has_no_dense_weight():
    block = GroupedPointwiseConv2d(64, 32, 8)
    assert block.dense_equivalent() is None and not hasattr(block, "weight")
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        gpconv.GroupedPointwiseLinear(64, 32, 8)(torch.randn(2, 63))


class Mlp(nn.Module):
    """A channels-last block (ConvNeXt's pointwise pair), a Linear subclass and a classifier."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.pwconv1 = nn.Linear(64, 256)
        self.pwconv2 = nn.Linear(256, 64, bias=False)
        self.attention = nn.MultiheadAttention(64, 4, batch_first=True)  # its out_proj is a Linear subclass
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):  # (N, H, W, C)
        x = x + self.pwconv2(torch.relu(self.pwconv1(self.norm(x))))
        tokens = x.flatten(1, 2)
        return self.classifier(self.attention(tokens, tokens, tokens)[0].mean(1))


def test_convert_linear_replaces_plain_linear_layers_only():
    torch.manual_seed(0)
    model = Mlp()
    converted = gpconv.convert(model, 16, linear=True, exclude=["classifier"])
    assert isinstance(converted.pwconv1, gpconv.GroupedPointwiseLinear)
    assert isinstance(converted.pwconv2, gpconv.GroupedPointwiseLinear) and converted.pwconv2.bias is None
    assert type(converted.classifier) is nn.Linear
    assert type(converted.attention.out_proj) is type(model.attention.out_proj)
    expected = gpconv.count_parameters(model)
    for cin, cout, bias in ((64, 256, True), (256, 64, False)):
        plan = make_plan(cin, cout, 16)
        expected += plan.parameter_count(batch_norm=False, bias=bias) - cin * cout - (cout if bias else 0)
    assert gpconv.count_parameters(converted) == expected
    rows = {row.name: row for row in gpconv.summarize(converted).rows}
    assert set(rows) == {"pwconv1", "pwconv2"} and rows["pwconv1"].linear
    x = torch.randn(2, 4, 4, 64)
    converted(x).sum().backward()
    assert all(p.grad is not None for p in converted.parameters())
    assert isinstance(gpconv.convert(model, 16).pwconv1, nn.Linear)  # linear=False by default
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(gpconv.prepare_for_inference(converted)(x), converted(x), rtol=1e-4, atol=1e-4)


def test_convert_notes_every_pointwise_convolution_it_keeps_dense():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 1, groups=4), nn.Conv2d(64, 64, 1, dilation=2),
                          nn.Conv2d(64, 64, 1, padding=1), nn.Conv2d(64, 8, 1), nn.Conv2d(8, 8, 1),
                          nn.Sequential(nn.Conv2d(8, 64, 1)), nn.Conv2d(64, 64, 1))
    with pytest.warns(UserWarning) as record:
        converted = gpconv.convert(model, 16, exclude=["6"])
    assert [str(w.message) for w in record] == [
        "gpconv.convert: 3 1x1 convolutions are not plain pointwise convolutions and stay dense: 1 (groups=4), "
        "2 (dilation=(2, 2)), 3 (padding=(1, 1))"]
    assert isinstance(converted[4], GroupedPointwiseConv2d) and isinstance(converted[7], GroupedPointwiseConv2d)
    kept = {layer.name: layer.reason for layer in gpconv.summarize(converted).kept}
    assert kept == {"1": "groups=4", "2": "dilation=(2, 2)", "3": "padding=(1, 1)", "5": "too small to group",
                    "6.0": "excluded"}
    assert "kept dense by convert: 5 (too small to group)" in str(gpconv.summarize(converted)).splitlines()


def test_linear_option_must_be_a_bool():
    with pytest.raises(TypeError, match="^linear must be True or False, got 'yes'$"):
        gpconv.convert(Mlp(), linear="yes")


def test_counting_sees_grouped_linear_layers():
    for cin, cout in ((64, 256), (256, 64)):
        dense = nn.Sequential(nn.Linear(cin, cout))
        grouped = gpconv.convert(dense, 16, linear=True)
        plan = grouped[0].plan
        assert gpconv.count_macs(dense, (4, 4, cin)) == 16 * cin * cout
        assert gpconv.count_macs(grouped, (4, 4, cin)) == 16 * plan.weight_count
