"""PyTorch's contracts on every kind of model gpconv hands back: plain nn.Conv2d/nn.Linear models, gpconv's
blocks and families, and converted third-party models (transformers, when installed).

Each test runs one contract over the whole matrix and compares with eager ``model.eval()`` (or with the
documented refusal): ``prepare_for_inference`` (with and without an example batch), empty batches,
unbatched ``(C, H, W)`` inputs, non-contiguous inputs, float64/bfloat16, ``torch.device("meta")`` +
``to_empty`` + ``load_state_dict``, ``torch.fx.symbolic_trace``, ``torch.export`` and ``torch.compile``
in training mode. Inputs are small so the module runs in seconds.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401 (nn.utils.prune)
from torch import nn

import gpconv
from gpconv.core.inference import prepare_for_inference

TOLERANCE = dict(atol=1e-4, rtol=1e-4)


class ViewClassifier(nn.Module):
    """A classifier whose own code flattens 4-D features with ``.view(n, -1)`` (contiguous maps only)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.fc = nn.Linear(48 * 4 * 4, 5)

    def forward(self, x):
        y = self.features(x)
        return self.fc(y.view(y.shape[0], -1))


class Logits(nn.Module):
    """A transformers image classifier called as ``model(x)``, returning the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def plain_convs():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 1),
                         nn.BatchNorm2d(64), nn.Hardswish(), nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32))


def conv_only():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.SiLU(), nn.Conv2d(64, 32, 1))


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def transformers_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[32, 48], depths=[1, 1])
    return Logits(transformers.ResNetForImageClassification(config))


def transformers_convnext():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(num_labels=10, hidden_sizes=[32, 48], depths=[1, 1], num_stages=2,
                                         layer_scale_init_value=0.5)
    return Logits(transformers.ConvNextForImageClassification(config))


# name -> (builder, input shape, whether the eager model takes unbatched (C, H, W) inputs: only without batch norms)
MODELS = {
    "plain convs": (plain_convs, (2, 3, 6, 6), False),
    "plain convs converted": (lambda: gpconv.convert(plain_convs(), 8), (2, 3, 6, 6), False),
    "conv only converted": (lambda: gpconv.convert(conv_only(), 8), (2, 3, 5, 5), True),
    "view classifier": (ViewClassifier, (2, 3, 4, 4), False),
    "view classifier converted": (lambda: gpconv.convert(ViewClassifier(), 8), (2, 3, 4, 4), False),
    "mlp converted": (lambda: gpconv.convert(mlp(), 8, linear=True), (2, 5, 32), False),
    "block": (lambda: gpconv.GroupedPointwiseConv2d(32, 48, 8, activation="swish"), (2, 32, 5, 5), True),
    "block v1 noL strided": (lambda: gpconv.GroupedPointwiseConv2d(48, 32, 16, version=1, l_layer=False, stride=2,
                                                                   bias=True), (2, 48, 5, 5), True),
    "mobilenet 16ch": (lambda: gpconv.create_model("mobilenet", 10, channels_per_group=16), (1, 3, 32, 32), False),
    "densenet 16ch": (lambda: gpconv.create_model("densenet_bc_100", 10, channels_per_group=16), (1, 3, 8, 8),
                      False),
    "transformers resnet converted": (lambda: gpconv.convert(transformers_resnet(), 8, exclude=["model.classifier"]),
                                      (1, 3, 32, 32), False),
    "transformers convnext converted": (lambda: gpconv.convert(transformers_convnext(), 8, linear=True,
                                                               exclude=["model.classifier"]), (1, 3, 32, 32), False),
}


def randomize(model, seed=0):
    """Random weights and batch-norm statistics, so that a fold that drops a term shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.running_var is not None:
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


def build(name, seed=0):
    """``(name, model in eval mode, input, conv-only)``."""
    builder, shape, conv_only = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert's notes on layers too small to group
        model = randomize(builder(), seed).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return name, model, x, conv_only


def prepared_quietly(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_for_inference(model, *args, **kwargs)


@pytest.fixture(params=list(MODELS))
def case(request):
    return build(request.param)


def test_prepared_equals_eager(case):
    _, model, x, _ = case
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 1e-3
        for example in (None, x):
            prepared = prepared_quietly(model, example)
            out = prepared(x)
            assert out.shape == expected.shape and out.is_contiguous() == expected.is_contiguous()
            assert torch.allclose(out, expected, **TOLERANCE)


def test_empty_batch(case):
    """An empty batch gives an empty output of the eager model's shape, or the eager model's own error."""
    _, model, x, _ = case
    prepared = prepared_quietly(model)
    with torch.no_grad():
        try:
            expected = model(x[:0])
        except RuntimeError as error:  # the model's own code (.view(0, -1)) refuses it
            with pytest.raises(RuntimeError, match=str(error).split(" ")[0]):
                prepared(x[:0])
            return
        assert expected.shape[0] == 0 and expected.shape[1:] == model(x).shape[1:]
        assert prepared(x[:0]).shape == expected.shape


def test_unbatched_input(case):
    _, model, x, conv_only = case
    if not conv_only:
        pytest.skip("the model's own code needs a batch dimension")
    with torch.no_grad():
        expected = model(x[:1])[0]
        assert torch.allclose(model(x[0]), expected, **TOLERANCE)
        assert torch.allclose(prepared_quietly(model)(x[0]), expected, **TOLERANCE)


def test_non_contiguous_input(case):
    _, model, x, _ = case
    wide = torch.stack([x, -x], dim=-1)[..., 0]  # a strided view with x's values
    assert not wide.is_contiguous() and torch.equal(wide, x)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(model(wide), expected, **TOLERANCE)
        assert torch.allclose(prepared_quietly(model)(wide), expected, **TOLERANCE)
        if x.dim() == 4 and not isinstance(model, ViewClassifier):  # .view(n, -1) refuses channels_last maps in eager
            assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, **TOLERANCE)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-4), (torch.bfloat16, 0.15)])
def test_dtypes(case, dtype, tolerance):
    _, model, x, _ = case
    with torch.no_grad():
        expected = model(x)
        typed = copy.deepcopy(model).to(dtype)
        out = typed(x.to(dtype))
        assert out.dtype == dtype
        scale = expected.abs().max()
        assert (out.float() - expected).abs().max() <= tolerance * scale
        if dtype == torch.float64:
            assert (prepared_quietly(typed)(x.to(dtype)).float() - expected).abs().max() <= tolerance * scale


def test_meta_device_to_empty_load_state_dict(case):
    name, model, x, _ = case
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deferred = MODELS[name][0]()
    deferred.to_empty(device="cpu")
    deferred.load_state_dict(model.state_dict())
    deferred.eval()
    with torch.no_grad():
        assert torch.allclose(deferred(x), model(x), **TOLERANCE)


def test_fx_symbolic_trace(case):
    _, model, x, _ = case
    if isinstance(model, Logits):
        pytest.skip("transformers models are traced with their own tracer, not torch.fx.symbolic_trace")
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), **TOLERANCE)


def test_torch_jit_trace(case):
    name, model, x, _ = case
    if isinstance(model, Logits) or name.startswith("densenet"):
        pytest.skip("transformers models return ModelOutput objects, which torch.jit.trace does not take; "
                    "DenseNet-BC-100 takes seconds (its blocks are covered by the others)")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model families' own shape checks become constants
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(x), model(x), **TOLERANCE)


def test_torch_export(case):
    name, model, x, _ = case
    if isinstance(model, Logits) or name.startswith("densenet"):
        pytest.skip("covered by the smaller models (export takes seconds per model)")
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), **TOLERANCE)


@pytest.mark.parametrize("name", ["block", "plain convs converted", "mlp converted"])
def test_torch_compile_in_training_with_default_recompute(name):
    """A training step through torch.compile (dynamo + AOT autograd; the inductor backend compiles C++ and
    is left out for time) gives eager's outputs, gradients and batch-norm statistics."""
    torch._dynamo.reset()
    _, model, x, _ = build(name)
    model.train()
    compiled_model = copy.deepcopy(model)
    for block in (m for m in model.modules() if isinstance(m, gpconv.GroupedPointwiseConv2d)):
        assert block.recompute == "all"
    compiled = torch.compile(compiled_model, backend="aot_eager")
    expected, out = model(x), compiled(x)
    assert torch.allclose(out, expected, **TOLERANCE)
    expected.square().sum().backward()
    out.square().sum().backward()
    for (name_, parameter), compiled_parameter in zip(model.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(compiled_parameter.grad, parameter.grad, atol=1e-4, rtol=1e-3), name_
    for buffer, compiled_buffer in zip(model.buffers(), compiled_model.buffers()):
        assert torch.allclose(compiled_buffer.float(), buffer.float(), **TOLERANCE)


# One test per reported case, with its neighbours.

def test_prepare_keeps_the_models_own_view_working():
    """channels_last is tried on the example batch and dropped where the model's code refuses it; without an
    example batch it is used only where every module is torch's or gpconv's; 4-D outputs stay contiguous."""
    _, model, x, _ = build("view classifier")
    with torch.no_grad():
        expected = model(x)
        for example in (x, None):
            prepared = prepared_quietly(model, example)
            summary = gpconv.inference_summary(prepared)
            assert not summary.channels_last
            assert ("fails on channels_last maps: view size" if example is not None else "ViewClassifier") in \
                summary.memory_format_reason
            assert torch.allclose(prepared(x), expected, **TOLERANCE)
        _, convs, x, _ = build("plain convs")
        prepared = prepared_quietly(convs)
        assert gpconv.inference_summary(prepared).channels_last  # torch modules only
        out = prepared(x)
        assert out.is_contiguous() and torch.allclose(out, convs(x), **TOLERANCE)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        assert prepared(channels_last).is_contiguous(memory_format=torch.channels_last)


def test_empty_batches_through_every_pointwise_form():
    """A batch of 0 images or positions through a prepared dense 1x1 convolution, a folded block (1x1 maps and
    larger), a training block and a grouped linear layer, as nn.Conv2d/nn.Linear take it."""
    conv = nn.Sequential(nn.Conv2d(4, 6, 1))
    assert prepared_quietly(conv)(torch.zeros(0, 4, 1, 1)).shape == (0, 6, 1, 1)
    block = randomize(gpconv.GroupedPointwiseConv2d(32, 48, 8)).eval()
    folded = prepared_quietly(block)
    for size in (1, 3):
        assert block(torch.zeros(0, 32, size, size)).shape == folded(torch.zeros(0, 32, size, size)).shape == \
            (0, 48, size, size)
    linear = gpconv.convert(nn.Sequential(nn.Linear(32, 48)), 8, linear=True)
    y = linear(torch.zeros(0, 32, requires_grad=True))
    assert y.shape == (0, 48) and y.requires_grad
    y.sum().backward()
    assert linear(torch.zeros(2, 0, 32)).shape == (2, 0, 48)
    assert torch.allclose(linear(torch.ones(32)), linear(torch.ones(1, 32))[0])  # 1-D input, as nn.Linear


def test_meta_device_blocks_get_their_indices():
    """Index buffers follow from the plan: after to_empty they are the plan's, not uninitialised memory; with
    load_state_dict(assign=True) they follow the loaded weights; the state_dict holds weights only, so old
    checkpoints load strictly."""
    trained = randomize(gpconv.GroupedPointwiseConv2d(32, 48, 8, activation="swish")).eval()
    x = torch.randn(2, 32, 3, 3)
    with torch.device("meta"):
        deferred = gpconv.GroupedPointwiseConv2d(32, 48, 8, activation="swish")
        assigned = gpconv.GroupedPointwiseConv2d(32, 48, 8, activation="swish")
    assert deferred.k.scattered_rows.is_meta
    deferred.to_empty(device="cpu")
    assert torch.equal(deferred.k.scattered_rows, trained.k.scattered_rows)
    deferred.load_state_dict(trained.state_dict())
    assigned.load_state_dict(trained.state_dict(), assign=True)
    assert not any(buffer.is_meta for buffer in assigned.buffers())
    with torch.no_grad():
        for model in (deferred, assigned):
            assert torch.equal(model.eval()(x), trained(x))
    index_names = {"interleave_index", "output_index", "merged_order", "scattered_rows", "scattered_columns",
                   "input_index"}
    assert not any(key.rsplit(".", 1)[-1] in index_names for key in trained.state_dict())
    with torch.device("meta"):  # DenseNet's channel interleaving is the same kind of buffer
        densenet = gpconv.create_model("densenet_bc_100", 10, channels_per_group=16)
    densenet.to_empty(device="cpu")
    reference = gpconv.create_model("densenet_bc_100", 10, channels_per_group=16)
    for (name, buffer), reference_buffer in zip(densenet.named_buffers(), reference.buffers()):
        if buffer.dtype == torch.long and name.endswith(("order", "index", "rows", "columns")):
            assert torch.equal(buffer, reference_buffer), name


def test_study_checkpoint_loads_and_evaluates_as_recorded():
    """A best.pt of the CPU study loads strictly into the model, into one built on the meta device, and its
    prepared form gives the same predictions on the recorded test split's first images."""
    from pathlib import Path

    from gpconv.experiments.checkpoint import load_checkpoint, load_model_from_checkpoint

    path = Path(__file__).resolve().parents[1] / "docs/results/cpu_cifar10_subset_runs/v2-16ch-seed0/best.pt"
    if not path.exists():
        pytest.skip("the study's checkpoint is not in this checkout")
    model, config, checkpoint = load_model_from_checkpoint(path)
    with torch.device("meta"):
        deferred = config.build()
    deferred.to_empty(device="cpu")
    deferred.load_state_dict(load_checkpoint(path)["model"], strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(deferred.eval()(x), expected)
        assert torch.allclose(prepared_quietly(model)(x), expected, **TOLERANCE)


def test_fx_traces_converted_models_in_train_and_eval_mode():
    _, model, x, _ = build("plain convs converted")
    for mode in (True, False):
        model.train(mode)
        traced = torch.fx.symbolic_trace(model)
        modules = [traced.get_submodule(node.target) for node in traced.graph.nodes if node.op == "call_module"]
        assert not any(isinstance(module, gpconv.GroupedPointwiseConv2d) for module in modules)  # traced through
        assert any(node.op == "call_function" and node.target is torch.conv2d for node in traced.graph.nodes)
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        assert torch.allclose(traced(x), expected, **TOLERANCE)


def test_convert_moves_hooks_to_the_block():
    """A forward hook that scales a replaced convolution's output, and a pre-hook, act on the block."""
    calls = []
    model = nn.Sequential(nn.Conv2d(32, 48, 1))
    model[0].register_forward_hook(lambda module, args, output: output * 3)
    model[0].register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    converted = gpconv.convert(model, 8)
    block = converted[0]
    assert isinstance(block, gpconv.GroupedPointwiseConv2d)
    x = torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        assert torch.allclose(converted(x), 3 * block.forward(x))
    assert calls == ["GroupedPointwiseConv2d"]
    assert not model[0]._forward_hooks or True  # the original keeps its own hooks
    assert len(model[0]._forward_hooks) == 1


def test_prepare_keeps_what_it_cannot_prove_equal():
    """The reported case (a hook scaling a convolution's output before a batch norm), and its kind: hooks on
    the batch norm or inside a block, parametrizations, subclasses, non-elementwise activations, Sequential
    subclasses with their own forward, global hooks. Each is kept, reported, and the output equals eager."""
    def conv_bn():
        model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).eval()
        with torch.no_grad():
            model[0].weight.fill_(0.7)
            model[0].bias.fill_(0.1)
            model[1].running_mean.fill_(1.0)
            model[1].running_var.fill_(4.0)
        return model

    class StandardizedConv2d(nn.Conv2d):  # weight standardization: scaling the weight changes nothing
        def forward(self, x):
            weight = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5) if self.weight.numel() > 1 \
                else self.weight
            return self._conv_forward(x, weight, self.bias)

    class Unscale(nn.Module):
        def forward(self, x):
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)

    class Tapped(nn.Sequential):  # reads the convolution's output itself
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    cases = {}
    model = conv_bn()
    model[0].register_forward_hook(lambda module, args, output: output * 3)
    cases["conv hook"] = (model, "0", "forward hooks")
    model = conv_bn()
    model[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    cases["bn pre-hook"] = (model, "0", "forward hooks")
    model = conv_bn()
    nn.utils.parametrizations.weight_norm(model[0])
    cases["parametrized"] = (model, "0", "parametrized")
    model = nn.Sequential(StandardizedConv2d(2, 2, 1), nn.BatchNorm2d(2)).eval()
    cases["subclass"] = (model, "0", "StandardizedConv2d is not Conv2d")
    model = Tapped(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).eval()
    cases["Sequential subclass"] = (model, None, None)
    block = gpconv.GroupedPointwiseConv2d(32, 48, 8, activation=Unscale()).eval()
    cases["channel-mixing activation"] = (block, "", "k.act: Unscale is not known to act on each element alone")
    block = gpconv.GroupedPointwiseConv2d(32, 48, 8).eval()
    block.k.bn.register_forward_hook(lambda module, args, output: output.abs())
    cases["hook inside a block"] = (block, "", "k.bn: forward hooks")
    for name, (model, kept_name, reason) in cases.items():
        randomize(model, seed=len(name))
        x = torch.randn(2, model[0].in_channels if isinstance(model, nn.Sequential) else 32, 3, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared = prepare_for_inference(model)
        with torch.no_grad():
            assert torch.allclose(prepared(x), model(x), **TOLERANCE), name
        summary = gpconv.inference_summary(prepared)
        if reason is None:  # no batch-norm fold is even tried: the Sequential's forward is its own
            assert not summary.kept and type(prepared[1]) is nn.BatchNorm2d, name
            continue
        assert [(k.name, k.reason.split(";")[0]) for k in summary.kept] == [(kept_name, reason)], name
        assert len(caught) == 1 and str(caught[0].message).startswith(
            "gpconv.prepare_for_inference: 1 modules kept as they are"), name
    model = conv_bn()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        with pytest.warns(UserWarning, match="global forward hooks registered: nothing rewritten"):
            prepared = prepare_for_inference(model)
    finally:
        handle.remove()
    assert type(prepared[1]) is nn.BatchNorm2d


def test_tied_and_shared_parameters_stay_shared():
    """A language-model head tied to its embedding stays dense (parameters do not go up), with a note in
    summarize and one warning; a module shared by two parents becomes one shared block; parametrized and
    weight-normed layers stay dense; a frozen layer's block is frozen."""
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(2, 16)
            self.mix = nn.Linear(16, 16)
            self.head = nn.Linear(16, 2, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.mix(self.embed(tokens)))

    model = TiedLM()
    with pytest.warns(UserWarning, match=r"1 layers stay dense, a block would lose part of what they are: "
                                         r"head \(weight tied to embed.weight\)"):
        converted = gpconv.convert(model, 4, linear=True)
    assert type(converted.head) is nn.Linear and converted.head.weight is converted.embed.weight
    assert isinstance(converted.mix, gpconv.GroupedPointwiseLinear)
    assert gpconv.count_parameters(converted) < gpconv.count_parameters(model)
    assert "kept dense by convert: head (weight tied to embed.weight)" in str(gpconv.summarize(converted))

    shared = nn.Conv2d(32, 32, 1)
    twice = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    converted = gpconv.convert(twice, 8)
    assert isinstance(converted[0], gpconv.GroupedPointwiseConv2d) and converted[0] is converted[2][0]

    layers = nn.Sequential(nn.Linear(32, 32), nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1))
    nn.utils.parametrizations.weight_norm(layers[0])
    nn.utils.spectral_norm(layers[1])
    nn.utils.parametrizations.spectral_norm(layers[2])
    layers[3].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = gpconv.convert(layers, 8, linear=True)
    kept = {layer.name: layer.reason for layer in gpconv.summarize(converted).kept}
    assert kept == {"0": "parametrized weight", "1": "weight computed by a hook", "2": "parametrized weight"}
    assert isinstance(converted[3], gpconv.GroupedPointwiseConv2d)
    assert not any(parameter.requires_grad for parameter in converted[3].parameters())
    pruned = nn.Sequential(nn.Conv2d(32, 32, 1)).requires_grad_(False)  # frozen: torch can copy it
    nn.utils.prune.l1_unstructured(pruned[0], "weight", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = gpconv.convert(pruned, 8)
    assert [(k.name, k.reason) for k in gpconv.summarize(converted).kept] == [("0", "weight computed by a hook")]
    nn.utils.weight_norm(layers[3])  # old-style weight norm: torch cannot deep-copy the module
    for function in (gpconv.convert, gpconv.prepare_for_inference):
        with pytest.raises(ValueError, match=r"^gpconv\.\w+ works on a copy of the model and torch cannot copy "
                                             r"this one: Only Tensors created explicitly by the user") as error:
            function(layers)
        assert "\n" not in str(error.value)


def test_transposed_convolutions_are_counted_by_their_input():
    """count_macs of transposed convolutions (the reported case: 4, not 16) agrees with torch's FLOP counter
    for strides, groups and paddings; attention is counted; operations outside the rules are named."""
    from torch.utils.flop_counter import FlopCounterMode

    assert gpconv.count_macs(nn.ConvTranspose2d(1, 1, 2, stride=2, bias=False), (1, 1, 1)) == 4
    for layer, shape in ((nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (6, 5, 5)),
                         (nn.ConvTranspose2d(3, 8, (2, 3), stride=(1, 2), bias=False), (3, 4, 6)),
                         (nn.Conv2d(4, 6, 3, groups=2), (4, 6, 6))):
        counter = FlopCounterMode(display=False)
        with counter:
            layer(torch.zeros(1, *shape))
        assert gpconv.count_macs(layer, shape) == counter.get_total_flops() // 2, layer

    class Attention(nn.Module):
        def forward(self, x):  # (1, C, H, W) -> attention over the H*W positions, one head
            tokens = x.flatten(2).transpose(1, 2)
            return nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)

    positions, channels = 6 * 6, 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpconv.count_macs(Attention(), (channels, 6, 6)) == 2 * positions * positions * channels
    with pytest.warns(UserWarning, match=r"^gpconv.count_computations: 2 operations outside the rules \(module "
                                         r"docstring\) were counted as zero: gelu \(1x\), native_layer_norm \(1x\)$"):
        gpconv.count_computations(nn.Sequential(nn.GELU(), nn.LayerNorm(6)), (2, 6, 6), softmax_output=False)


def test_lazy_layers_are_converted_once_initialized():
    model = nn.Sequential(nn.LazyConv2d(32, 1), nn.LazyConv2d(48, 1))
    with pytest.warns(UserWarning, match=r"0 \(lazy, not initialized yet: run a batch through the model first\)"):
        converted = gpconv.convert(model, 8)
    assert not any(isinstance(m, gpconv.GroupedPointwiseConv2d) for m in converted.modules())
    model(torch.randn(1, 32, 2, 2))  # now nn.Conv2d(32, 32, 1) and nn.Conv2d(32, 48, 1)
    converted = gpconv.convert(model, 8)
    assert all(isinstance(m, gpconv.GroupedPointwiseConv2d) for m in converted)
