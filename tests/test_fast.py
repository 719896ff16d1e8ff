"""The fast execution equals the straightforward (reference) one."""

import copy

import torch
from hypothesis import example, given, settings, strategies as st

import gpconv
from gpconv import GroupedPointwiseConv2d
from gpconv.block import set_execution


def forward_backward(model, x, weights):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def force_layers(model, layer_execution):
    """Fast execution with every grouped layer in ``layer_execution`` ("merged" or "dense")."""
    set_execution(model, "fast")
    for module in model.modules():
        if isinstance(module, gpconv.block.GroupedConvLayer):
            module.execution = layer_execution
    return model


def assert_same(model, x, generator, layer_execution=None):
    fast = set_execution(model, "fast") if layer_execution is None else force_layers(model, layer_execution)
    reference = set_execution(copy.deepcopy(model), "reference")
    weights = torch.randn(fast(x).shape, generator=generator)
    out_fast, grads_fast = forward_backward(fast, x, weights)
    out_ref, grads_ref = forward_backward(reference, x, weights)
    assert torch.allclose(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        assert torch.allclose(grads_fast[name], grads_ref[name], atol=1e-4, rtol=1e-4), name


@settings(max_examples=40, deadline=None)
@given(in_channels=st.integers(1, 64), out_channels=st.integers(1, 64), channels_per_group=st.integers(1, 12),
       version=st.sampled_from([1, 2]), l_layer=st.booleans(), bias=st.booleans(),
       activation=st.sampled_from([None, "swish", "relu"]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 999))
@example(14, 10, 4, 2, True, True, "swish", 1, 0)
def test_fast_block_equals_reference(in_channels, out_channels, channels_per_group, version, l_layer, bias,
                                     activation, stride, seed):
    generator = torch.Generator().manual_seed(seed)
    block = GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, version=version, l_layer=l_layer,
                                   bias=bias, activation=activation, stride=stride)
    x = torch.randn(3, in_channels, 5, 4, generator=generator)
    for layer_execution in (None, "merged", "dense"):  # the fast default, and each layer form forced
        assert_same(block, x, generator, layer_execution)


def test_fast_kefficientnet_b0_equals_reference():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=16, skip_strides=3)
    model.classifier[0].p = 0.0  # dropout would draw different masks in the two runs
    for module in model.modules():
        if isinstance(module, gpconv.layers.StochasticDepth):
            module.rate = 0.0
    assert_same(model, torch.randn(2, 3, 32, 32, generator=generator), generator)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        assert torch.allclose(set_execution(model, "fast")(x), set_execution(model, "reference")(x), atol=1e-5)


def test_execution_names_are_checked():
    block = GroupedPointwiseConv2d(32, 32, 8)
    try:
        block.execution = "turbo"
    except ValueError as error:
        assert "execution must be one of fast, reference" in str(error)
    else:
        raise AssertionError("no error")
