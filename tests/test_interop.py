"""gpconv.convert on third-party networks: transformers' ResNet, MobileNetV2, EfficientNet and ConvNeXt
built from (small) configs, no weights downloaded. Skipped when transformers is absent (extra ``interop``)."""

import pytest
import torch
from torch import nn

import gpconv
from conftest import SHARED, groupable_layers, predicted_parameter_drop
from gpconv.core.convert import GROUPED_BLOCKS
from gpconv.experiments.data import load_cifar, to_float

transformers = pytest.importorskip("transformers")

CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"
CHANNELS_PER_GROUP = 8


def resnet():
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[32, 64, 96, 128],
                                       depths=[1, 1, 1, 1])
    return transformers.ResNetForImageClassification(config)


def mobilenet_v2():
    config = transformers.MobileNetV2Config(num_labels=10, depth_multiplier=0.35, image_size=32,
                                              classifier_dropout_prob=0.0)
    return transformers.MobileNetV2ForImageClassification(config)


def efficientnet():
    config = transformers.EfficientNetConfig(num_labels=10, width_coefficient=0.5, depth_coefficient=0.5,
                                             image_size=32, hidden_dim=640, dropout_rate=0.0)
    return transformers.EfficientNetForImageClassification(config)


def convnext():
    config = transformers.ConvNextConfig(num_labels=10, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1],
                                         layer_scale_init_value=0.1)  # 1e-6: blocks start as identities
    return transformers.ConvNextForImageClassification(config)


def mobilenet_v1():
    config = transformers.MobileNetV1Config(num_labels=10, depth_multiplier=0.25, image_size=32)
    return transformers.MobileNetV1ForImageClassification(config)


def convnext_v2():
    config = transformers.ConvNextV2Config(num_labels=10, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1])
    return transformers.ConvNextV2ForImageClassification(config)


# builder, convert options, the least fraction of parameters convert must remove (issue 12's acceptance)
MODELS = {
    "resnet": (resnet, {}, 0.40),
    "mobilenet_v2": (mobilenet_v2, {}, 0.25),
    "efficientnet": (efficientnet, {}, 0.25),
    "convnext": (convnext, dict(linear=True), 0.40),
}
# more models of the same kinds, with no special case anywhere: forward, backward and parameter drop only
MORE_MODELS = {
    "mobilenet_v1": (mobilenet_v1, {}, 0.25),
    "convnext_v2": (convnext_v2, dict(linear=True), 0.40),
}


def converted(name, seed=0):
    """The model (PyTorch's default initialisation: with transformers' own, these tiny EfficientNets'
    activations vanish stage after stage and only the classifier's bias learns) and its conversion."""
    build, options, _ = {**MODELS, **MORE_MODELS}[name]
    torch.manual_seed(seed)
    model = build()
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model, gpconv.convert(model, CHANNELS_PER_GROUP, exclude=["classifier"], **options)


def logits(model, x):
    return model(pixel_values=x).logits


def outputs(model, x):
    """Logits and the last feature maps (some configs start with an all-zero classifier)."""
    result = model(pixel_values=x, output_hidden_states=True)
    return torch.cat([result.logits.flatten(), result.hidden_states[-1].flatten()])


def calibrated(model):
    """``model`` in eval mode after a few batches in train mode set its batch-norm statistics: at
    initialisation, EfficientNet's activations vanish stage after stage with the default statistics."""
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(pixel_values=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


@pytest.mark.parametrize("name", [*MODELS, *MORE_MODELS])
def test_converted_model_runs_in_both_modes_and_trains_every_parameter(name):
    _, model = converted(name)
    # 64x64: at 32x32 these models end on 1x1 maps, where a batch norm over a few samples followed by
    # ReLU6 can pass no gradient at all (the unconverted MobileNetV1 too)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert logits(model, x).shape == (4, 10)
    model.train()
    logits(model, x).logsumexp(1).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
    # some gradients vanish in the unconverted models too (EfficientNet's squeeze-excitation at init)
    blocks = [m for m in model.modules() if isinstance(m, GROUPED_BLOCKS)]
    assert blocks and all(any(p.grad.abs().sum() > 0 for p in block.parameters()) for block in blocks)


@pytest.mark.parametrize("name", [*MODELS, *MORE_MODELS])
def test_parameter_drop_is_what_the_plans_predict(name):
    original, model = converted(name)
    _, options, least_drop = {**MODELS, **MORE_MODELS}[name]
    expected = groupable_layers(original, "classifier", options.get("linear", False), CHANNELS_PER_GROUP)
    summary = gpconv.summarize(model)
    assert {row.name: (row.in_channels, row.out_channels) for row in summary.rows} == {
        layer: shape[:2] for layer, shape in expected.items()}
    before, after = gpconv.count_parameters(original), gpconv.count_parameters(model)
    assert before - after == predicted_parameter_drop(expected.values(), CHANNELS_PER_GROUP)
    assert summary.params_before == before and summary.model_params == after
    assert 1 - after / before >= least_drop


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_into_a_freshly_converted_model(name, tmp_path):
    model = calibrated(converted(name, seed=0)[1])
    path = tmp_path / "converted.pt"
    torch.save(model.state_dict(), path)
    fresh = calibrated(converted(name, seed=1)[1])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert outputs(model, x).abs().sum() > 0
        assert not torch.equal(outputs(fresh, x), outputs(model, x))
        fresh.load_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(outputs(fresh, x), outputs(model, x))


@pytest.mark.parametrize("name", MODELS)
def test_prepare_for_inference_keeps_the_outputs(name):
    model = calibrated(converted(name)[1])
    fast = gpconv.prepare_for_inference(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert outputs(model, x).abs().sum() > 0
        torch.testing.assert_close(outputs(fast, x), outputs(model, x), rtol=1e-3, atol=1e-3)


def test_mobilenet_v2_reads_the_convolution_attributes_of_a_block():
    """MobileNetV2's TensorFlow padding reads stride, kernel_size and dilation as pairs."""
    _, model = converted("mobilenet_v2")
    assert model.config.tf_padding
    block = model.mobilenet_v2.conv_1x1.convolution
    assert isinstance(block, gpconv.GroupedPointwiseConv2d)
    assert (block.stride, block.kernel_size, block.dilation) == ((1, 1), (1, 1), (1, 1))


@pytest.fixture(scope="module")
def cifar_batch():
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip("CIFAR-10 subset not present (../shared/data/cifar10-subset)")
    train, _, _ = load_cifar("cifar10", CIFAR_SUBSET, download=False)
    return to_float(train.images[:64]), train.labels[:64]


@pytest.mark.parametrize("name", MODELS)
def test_short_training_on_cifar10_lowers_the_loss(name, cifar_batch):
    images, labels = cifar_batch
    _, model = converted(name)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_function = nn.CrossEntropyLoss()

    def loss():
        return loss_function(logits(model, images), labels)

    with torch.no_grad():
        initial = loss().item()
    for _ in range(12):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        final = loss().item()
    print(f"{name}: loss {initial:.3f} -> {final:.3f}")
    assert final < 0.8 * initial
