"""prepare_for_inference: folded batch norms and folded grouped blocks equal the eval model."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import gpconv
from gpconv import GroupedPointwiseConv2d
from gpconv.core.plan import PLAN_VERSIONS
from gpconv.core.inference import FoldedGroupedPointwiseConv2d, KerasSameConv2d, choose_executions, prepare_for_inference
from gpconv.layers import KerasPad2d


def randomize_batch_norms(model, generator):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                if module.weight is not None:  # shift-only batch norms (Inception V3) learn no scale
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(generator=generator)
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


@settings(max_examples=40, deadline=None)
@given(in_channels=st.integers(1, 64), out_channels=st.integers(1, 64), channels_per_group=st.integers(1, 12),
       version=st.sampled_from(PLAN_VERSIONS), l_layer=st.booleans(), bias=st.booleans(),
       activation=st.sampled_from([None, "swish", "sigmoid"]), size=st.sampled_from([1, 5]),
       channels_last=st.booleans(), seed=st.integers(0, 999))
def test_folded_block_equals_eval_block(in_channels, out_channels, channels_per_group, version, l_layer, bias,
                                        activation, size, channels_last, seed):
    generator = torch.Generator().manual_seed(seed)
    block = GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, version=version, l_layer=l_layer,
                                   bias=bias, activation=activation)
    randomize_batch_norms(block, generator)
    block.eval()
    prepared = prepare_for_inference(block, channels_last=channels_last)
    assert isinstance(prepared, FoldedGroupedPointwiseConv2d)
    x = torch.randn(3, in_channels, size, size, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if prepared.l is None or activation is None:
        assert "dense" in prepared.executions  # linear up to one final activation
    if prepared.l is not None and activation is None:
        assert "factored" in prepared.executions
    expected = block(x)
    with torch.no_grad():
        for execution in prepared.executions:
            prepared.execution = execution
            for layer in prepared.layers:  # every group factor of each layer gives the same outputs
                for factor in layer.group_factors():
                    layer.super_group(factor)
                    assert torch.allclose(prepared(x), expected, atol=1e-4, rtol=1e-4), (execution, factor)


def test_block_folds_itself():
    """``block.fold()`` is the module prepare_for_inference puts in the block's place (same numbers, bit for
    bit, before any execution is chosen), folds the running statistics even in training mode, and leaves
    the block as it was."""
    generator = torch.Generator().manual_seed(7)
    for shape, activation in (((14, 10, 4), "swish"), ((24, 48, 4), None), ((32, 32, 16), "relu")):
        block = GroupedPointwiseConv2d(*shape, version=1 if shape == (24, 48, 4) else 2, activation=activation)
        randomize_batch_norms(block, generator)
        before = {name: tensor.clone() for name, tensor in block.state_dict().items()}
        folded = block.fold()
        assert isinstance(folded, FoldedGroupedPointwiseConv2d) and folded.execution == "grouped"
        assert len(folded.layers) == len(block.layers) == len(block.plan.layers)
        assert block.training and all(torch.equal(before[n], t) for n, t in block.state_dict().items())
        assert not any(p.requires_grad for p in folded.parameters())
        prepared = prepare_for_inference(block, channels_last=False)
        prepared.execution = "grouped"
        for layer in prepared.layers:
            layer.super_group(1)
        x = torch.randn(2, shape[0], 4, 4, generator=generator)
        with torch.no_grad():
            assert torch.equal(folded(x), prepared(x))
            assert torch.allclose(folded(x), block.eval()(x), atol=1e-5, rtol=1e-5), shape
    with pytest.raises(ValueError, match="needs a folded L exactly when the plan has an L layer"):
        FoldedGroupedPointwiseConv2d(block.plan, block.k.folded(), block.k.folded())


def test_prepared_kefficientnet_equals_eval_model():
    generator = torch.Generator().manual_seed(0)
    for channels_per_group in (None, 16):
        model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=channels_per_group, skip_strides=3)
        randomize_batch_norms(model, generator)
        model.eval()
        x = torch.randn(2, 3, 32, 32, generator=generator)
        prepared = prepare_for_inference(model, example_input=x)  # times both forms of every block
        assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
        assert model.training is False and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        with torch.no_grad():
            expected = model(x)
            assert expected.abs().max() > 1e-3  # the comparison below is not between two near-zero outputs
            assert torch.allclose(prepared(x), expected, atol=1e-4, rtol=1e-4)


def test_prepared_zoo_models_equal_eval_models():
    """Every family, including Inception's shift-only batch norms, folds exactly."""
    generator = torch.Generator().manual_seed(3)
    for arch, size in (("mobilenet", 32), ("mobilenet_v3_large", 32), ("densenet_bc_100", 16), ("inception_v3", 75)):
        model = gpconv.create_model(arch, 10, channels_per_group=16)
        randomize_batch_norms(model, generator)
        model.eval()
        x = torch.randn(1, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = model(x)
            assert torch.allclose(prepare_for_inference(model)(x), expected, atol=1e-4, rtol=1e-4), arch


@settings(max_examples=30, deadline=None)
@given(kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), height=st.integers(5, 12),
       width=st.integers(5, 12), depthwise=st.booleans(), seed=st.integers(0, 999))
def test_keras_same_convolution_equals_pad_then_convolve(kernel, stride, height, width, depthwise, seed):
    """Keras' asymmetric padding without the padded copy, for odd and even sizes."""
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(6, 6, kernel, stride, 0, groups=6 if depthwise else 1, bias=True)
    x = torch.randn(2, 6, height, width, generator=generator)
    with torch.no_grad():
        expected = conv(KerasPad2d(kernel)(x))
        out = KerasSameConv2d(conv)(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_prepared_efficientnet_pads_without_copies():
    model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=16).eval()
    prepared = prepare_for_inference(model)
    pads = sum(isinstance(m, KerasPad2d) for m in model.modules())
    assert pads == 5  # the stem and four strided depthwise convolutions
    assert sum(isinstance(m, KerasSameConv2d) for m in prepared.modules()) == pads
    assert not any(isinstance(m, KerasPad2d) for m in prepared.modules())


def test_block_forms_and_group_factors():
    """A projection (K with many small groups, L, no activation) has all three forms; the chosen form
    and group factors are kept, and a form a block does not have is refused."""
    generator = torch.Generator().manual_seed(5)
    block = GroupedPointwiseConv2d(192, 32, 16)
    randomize_batch_norms(block, generator)
    prepared = prepare_for_inference(block.eval())
    assert prepared.executions == ("grouped", "factored", "dense")
    assert prepared.k.group_factors() == [1, 2, 3, 4, 6]  # divisors of 12 groups; at most 128 channels
    x = torch.randn(2, 192, 6, 6, generator=generator).contiguous(memory_format=torch.channels_last)
    choose_executions(prepared, x)  # timed: any choice must keep the outputs
    with torch.no_grad():
        assert torch.allclose(prepared(x), block(x), atol=1e-4, rtol=1e-4)
    expansion = prepare_for_inference(GroupedPointwiseConv2d(32, 192, 16, activation="swish").eval())
    assert expansion.executions == ("grouped", "dense")
    with pytest.raises(ValueError) as error:
        expansion.execution = "factored"
    assert str(error.value) == "this block's executions are grouped, dense; got 'factored'"


def test_blocks_of_one_shape_on_inputs_of_one_shape_are_timed_once():
    """choose_executions times a (block shape, input shape) once and gives the same form to its twins; a block of
    another shape is timed on its own. The timer below makes the slowest-looking form depend on the call order,
    so a twin that were timed again could get another form."""
    generator = torch.Generator().manual_seed(2)
    blocks = [GroupedPointwiseConv2d(64, 64, 8) for _ in range(3)] + [GroupedPointwiseConv2d(64, 32, 8)]
    for block in blocks:
        randomize_batch_norms(block, generator)
    model = prepare_for_inference(nn.Sequential(*blocks).eval())
    calls = []

    def timer(module, x):
        calls.append((type(module).__name__, tuple(x.shape)))
        return float(len(calls) % 3)

    x = torch.randn(2, 64, 5, 5, generator=generator).contiguous(memory_format=torch.channels_last)  # as blocks give
    chosen = choose_executions(model, x, timer)
    forms = [model[i].form for i in range(4)]
    assert forms[0] == forms[1] == forms[2] and set(chosen) == {"0", "1", "2", "3"}
    alone = []
    choose_executions(prepare_for_inference(nn.Sequential(GroupedPointwiseConv2d(64, 64, 8)).eval()), x,
                      lambda m, y: alone.append(1) or float(len(alone) % 3))
    other = []
    choose_executions(prepare_for_inference(nn.Sequential(GroupedPointwiseConv2d(64, 32, 8)).eval()), x,
                      lambda m, y: other.append(1) or float(len(other) % 3))
    assert len(calls) == len(alone) + len(other)  # the twins cost nothing
    with torch.no_grad():
        assert torch.allclose(model(x), nn.Sequential(*blocks).eval()(x), atol=1e-4, rtol=1e-4)
