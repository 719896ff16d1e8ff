"""Width multipliers (issue 25): EfficientNet's width_coefficient, MobileNet's alpha, MobileNet V3's
width_mult, counted as timm and torchvision build them, through create_model, ModelConfig, the CLI and
sweep configs."""

import pytest
import torch

import gpconv
from gpconv.cli import main
from gpconv.core.counting import count_parameters
from gpconv.experiments.config import ModelConfig
from gpconv.experiments.sweep import expand_runs
from gpconv.models import scale_channels

WIDTHS = (1.0, 0.75, 0.5, 0.37)


def test_scale_channels_rounds_to_multiples_of_8_never_10_percent_down():
    assert [scale_channels(c, 0.5) for c in (16, 24, 40, 1280)] == [8, 16, 24, 640]
    assert scale_channels(32, 0.37) == 16  # 11.84 -> 8 would be 32% down: one more 8
    assert scale_channels(1280, 1.0) == 1280
    for width in (0, -1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="width must be a number > 0"):
            scale_channels(16, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_mobilenet_v3_width_is_torchvision_width_mult(width):
    mobilenetv3 = pytest.importorskip("torchvision.models.mobilenetv3")
    settings, last_channel = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_large", width_mult=width)
    theirs = mobilenetv3.MobileNetV3(settings, last_channel, num_classes=10)
    ours = gpconv.create_model("mobilenet_v3_large", 10, width=width)
    assert count_parameters(ours) == count_parameters(theirs)
    convs = lambda model: [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert convs(ours.features) == convs(theirs.features)
    assert convs(ours.head) == [theirs.classifier[0].out_features]  # 1280 scaled too (Keras' alpha < 1 keeps it)


@pytest.mark.parametrize("width", WIDTHS)
def test_efficientnet_and_mobilenet_widths_are_timms_channel_multiplier(width):
    pytest.importorskip("timm")
    from timm.models.efficientnet import _gen_efficientnet, _gen_mobilenet_v1

    b0 = _gen_efficientnet("efficientnet_b0", channel_multiplier=width, depth_multiplier=1.0, pretrained=False,
                           num_classes=10)
    assert count_parameters(gpconv.create_model("efficientnet_b0", 10, width=width)) == count_parameters(b0)
    v1 = _gen_mobilenet_v1("mobilenetv1_100", channel_multiplier=width, pretrained=False, num_classes=10)
    assert count_parameters(gpconv.create_model("mobilenet", 10, width=width)) == count_parameters(v1)


def test_efficientnet_width_multiplies_the_family_coefficient():
    """B0 at width 1.1 has B2's channels (B2's width_coefficient is 1.1; only the depth differs)."""
    widths = lambda model: [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    b0 = gpconv.create_model("efficientnet_b0", 10, width=1.1)
    b2 = gpconv.create_model("efficientnet_b2", 10)
    assert widths(b0) == widths(b2) and b0.num_features == b2.num_features == 1408
    assert gpconv.create_model("efficientnet_b2", 10, width=0.5).num_features == scale_channels(1280, 0.55)


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet", "mobilenet_v3_large"])
def test_thinned_k_variants_run_forward_and_backward(arch):
    model = gpconv.create_model(arch, 10, channels_per_group=16, width=0.5, skip_strides=2)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert count_parameters(model) < count_parameters(gpconv.create_model(arch, 10, channels_per_group=16))


def test_mobilenet_v3_skip_strides_keeps_the_input_size():
    model = gpconv.create_model("mobilenet_v3_large", 10, skip_strides=2)
    shapes = []
    model.features.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape[-1]))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == [32 // 8]  # strides 32 -> 8: the stem and the first strided block keep 32x32
    with pytest.raises(ValueError, match="skip_strides must be between 0 and 5"):
        gpconv.create_model("mobilenet_v3_large", 10, skip_strides=6)


def test_model_config_width_round_trip_and_refusals():
    config = ModelConfig("mobilenet", width=0.5)
    assert ModelConfig.from_dict({"arch": "mobilenet", "width": 0.5}).build().num_features == 512
    assert ModelConfig.from_dict({"arch": "mobilenet"}).width == 1.0  # a checkpoint from before widths
    assert count_parameters(config.build()) == count_parameters(gpconv.create_model("mobilenet", 10, width=0.5))
    with pytest.raises(ValueError, match="densenet_bc_100 has no width multiplier"):
        ModelConfig("densenet_bc_100", width=0.5)
    with pytest.raises(ValueError, match="width must be a number > 0"):
        ModelConfig("mobilenet", width=0.0)
    assert ModelConfig("densenet_bc_100", width=1).build() is not None


def test_sweep_width_key_names_the_runs_and_builds_the_width():
    specs = expand_runs({"arch": "efficientnet_b0", "dataset": "synthetic", "seeds": [0, 1],
                         "groups": [{"variants": ["baseline", "v2-16ch"]}, {"variants": ["baseline"], "width": 0.37}]})
    assert [s.name for s in specs] == ["baseline-seed0", "v2-16ch-seed0", "baseline-seed1", "v2-16ch-seed1",
                                       "baseline-w0.37-seed0", "baseline-w0.37-seed1"]
    assert specs[-1].model_config().width == 0.37 and specs[0].model_config().width == 1.0
    for bad, message in ((0, "expected a number > 0"), ("x", "expected a number > 0")):
        with pytest.raises(ValueError, match=message):
            expand_runs({"arch": "mobilenet", "dataset": "synthetic", "variants": ["baseline"], "width": bad})
    with pytest.raises(ValueError, match="densenet_bc_100 has no width multiplier"):
        expand_runs({"arch": "densenet_bc_100", "dataset": "synthetic", "variants": ["baseline"], "width": 0.5})


def test_cli_table_and_summary_show_the_width(capsys):
    assert main(["table", "--arch", "mobilenet", "--variants", "baseline,v2-16ch", "--widths", "1,0.5",
                 "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    half = f"{count_parameters(gpconv.create_model('mobilenet', 10, width=0.5)):,}"
    assert "baseline (width 0.5)" in out and "v2-16ch (width 0.5)" in out and half in out
    assert main(["summary", "mobilenet", "--width", "0.5", "--compare", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "baseline (width 0.5)" in out and half in out and "3,217,226" in out  # the width-1 baseline beside it
    assert main(["summary", "densenet_bc_100", "--width", "0.5"]) == 2
    assert "'width'" in capsys.readouterr().err


def test_cli_refuses_a_width_a_family_lacks_in_one_line(capsys, tmp_path):
    assert main(["train", "--arch", "densenet_bc_100", "--width", "0.5", "--dataset", "synthetic",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "densenet_bc_100 has no width multiplier" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["table", "--widths", "0,1"])
