"""gpconv.convert on the models people build with timm and torchvision (issue 23): each model is built
once per module (random weights, 10 classes, nothing downloaded), converted with 16 channels per
group, and checked at small input sizes: forward in train and eval mode, a gradient for every
parameter, the parameter drop the plans predict (and the figures of docs/convert.md), a state dict
loaded into a freshly converted model, ``prepare_for_inference`` and ``export_onnx``.

torchvision 0.28.0 beside the CPU torch needs tests/_torchvision_compat.py (applied by conftest.py)."""

import copy
import os

import pytest
import torch

import gpconv
from conftest import groupable_layers, predicted_parameter_drop
from gpconv.core.convert import GROUPED_BLOCKS, is_plain_linear

timm = pytest.importorskip("timm")
tv_models = pytest.importorskip("torchvision.models")

CHANNELS_PER_GROUP = 16
CLASSES = 10


def _timm(name):
    return lambda: timm.create_model(name, num_classes=CLASSES)


def _torchvision(name):
    return lambda: getattr(tv_models, name)(num_classes=CLASSES)


# name -> (builder, classifier kept dense, convert options, trainable parameters before and after in millions:
# the measurement for timm, docs/convert.md's table for both; benchmarks/convert_models.py prints them)
MODELS = {
    "timm/resnet50": (_timm("resnet50"), "fc", {}, (23.53, 11.82)),
    "timm/efficientnet_b0": (_timm("efficientnet_b0"), "classifier", {}, (4.02, 0.62)),
    "timm/mobilenetv3_large_100": (_timm("mobilenetv3_large_100"), "classifier", {}, (4.21, 0.39)),
    "timm/convnext_tiny": (_timm("convnext_tiny"), "head.fc", {"linear": True}, (27.83, 2.59)),
    "timm/regnety_016": (_timm("regnety_016"), "head.fc", {}, (10.32, 2.59)),
    "torchvision/resnet50": (_torchvision("resnet50"), "fc", {}, (23.53, 11.82)),
    "torchvision/mobilenet_v3_large": (_torchvision("mobilenet_v3_large"), "classifier", {}, (4.21, 1.60)),
    "torchvision/efficientnet_b0": (_torchvision("efficientnet_b0"), "classifier", {}, (4.02, 0.62)),
}
# ONNX export takes 20-30 s a model here (torch.export): one model of each kind of block by default (timm's
# hard-swish and squeeze-excitation, grouped nn.Linear, torchvision's stochastic depth); GPCONV_EXPORT_ALL=1
# exports all eight.
EXPORTED = list(MODELS) if os.environ.get("GPCONV_EXPORT_ALL") else [
    "timm/mobilenetv3_large_100", "timm/convnext_tiny", "torchvision/efficientnet_b0"]


def converted(name, seed=0):
    build, classifier, options, _ = MODELS[name]
    torch.manual_seed(seed)
    dense = build()
    return dense, gpconv.convert(dense, CHANNELS_PER_GROUP, exclude=[classifier], **options)


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """``(name, dense model, converted model)``, built once per module."""
    return (request.param,) + converted(request.param)


def calibrated(model):
    """A copy of ``model`` in eval mode whose batch-norm statistics a few train-mode batches set, its dense
    linear layers at PyTorch's default initialisation (torchvision's, N(0, 0.01), leave near-zero logits)."""
    model = copy.deepcopy(model).train()
    for module in model.modules():
        if is_plain_linear(module):
            module.reset_parameters()
    with torch.no_grad():
        for seed in range(3):
            model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def test_forward_in_both_modes_and_a_gradient_for_every_parameter(pair):
    name, _, model = pair
    model = copy.deepcopy(model)
    for module in model.modules():  # timm starts each residual branch's last batch norm at 0: no gradient before it
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.ones_(module.weight)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, CLASSES)
    model.train()
    model.zero_grad()
    model(x).logsumexp(1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), f"{name}: {parameter_name}"
    blocks = [module for module in model.modules() if isinstance(module, GROUPED_BLOCKS)]
    assert blocks and all(any(p.grad.abs().sum() > 0 for p in block.parameters()) for block in blocks)


def test_parameter_drop_is_what_the_plans_predict(pair):
    name, dense, model = pair
    _, classifier, options, (million_before, million_after) = MODELS[name]
    expected = groupable_layers(dense, classifier, options.get("linear", False), CHANNELS_PER_GROUP)
    assert expected and {row.name: (row.in_channels, row.out_channels) for row in gpconv.summarize(model).rows} == {
        layer: shape[:2] for layer, shape in expected.items()}
    before, after = gpconv.count_parameters(dense), gpconv.count_parameters(model)
    assert before - after == predicted_parameter_drop(expected.values(), CHANNELS_PER_GROUP)
    assert (round(before / 1e6, 2), round(after / 1e6, 2)) == (million_before, million_after)


def test_state_dict_round_trip_into_a_freshly_converted_model(pair, tmp_path):
    name, _, model = pair
    model = calibrated(model)
    torch.save(model.state_dict(), tmp_path / "converted.pt")
    fresh = converted(name, seed=1)[1].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        fresh.load_state_dict(torch.load(tmp_path / "converted.pt", weights_only=True))
        assert torch.equal(fresh(x), model(x))


def test_prepare_for_inference_keeps_the_outputs(pair):
    _, _, model = pair
    model = calibrated(model)
    fast = gpconv.prepare_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(fast(x), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("name", EXPORTED)
def test_export_onnx_matches_torch(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model = calibrated(converted(name)[1])
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = gpconv.export_onnx(model, tmp_path / "model.onnx", example_input=images[:2], verify_input=images)
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert result.max_difference <= 1e-4 * max(1.0, model(images).abs().max().item())
