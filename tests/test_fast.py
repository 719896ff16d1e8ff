"""The fast execution equals the straightforward (reference) one."""

import copy

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import gpconv
from gpconv import GroupedPointwiseConv2d
from gpconv.core.block import set_execution


def forward_backward(model, x, weights):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def force_layers(model, layer_execution):
    """Fast execution with every grouped layer in ``layer_execution`` ("merged" or "dense")."""
    set_execution(model, "fast")
    for module in model.modules():
        if isinstance(module, gpconv.core.block.GroupedConvLayer):
            module.execution = layer_execution
    return model


def assert_same(model, x, generator, layer_execution=None, weight_scale=1.0, out_tolerance=1e-5, grad_tolerance=1e-4):
    fast = set_execution(model, "fast") if layer_execution is None else force_layers(model, layer_execution)
    reference = set_execution(copy.deepcopy(model), "reference")
    weights = torch.randn(fast(x).shape, generator=generator, dtype=x.dtype) * weight_scale
    out_fast, grads_fast = forward_backward(fast, x, weights)
    out_ref, grads_ref = forward_backward(reference, x, weights)
    assert torch.allclose(out_fast, out_ref, atol=out_tolerance, rtol=out_tolerance)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        assert torch.allclose(grads_fast[name], grads_ref[name], atol=grad_tolerance, rtol=grad_tolerance), name


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
    x = torch.randn(2, 3, 32, 32, generator=generator)
    # float32: a loss of the usual scale (gradients of order 1; with batch-norm over 2 samples, a loss
    # summed with unit weights gives depthwise gradients near 70, whose float32 rounding alone is ~1e-4)
    assert_same(model, x, generator, weight_scale=0.1)
    # float64: the same math, not just the same up to float32 rounding
    assert_same(copy.deepcopy(model).double(), x.double(), generator, out_tolerance=1e-10, grad_tolerance=1e-9)
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


def saved_bytes(model, x):
    """Bytes of the tensors autograd keeps for the backward pass of ``model(x)`` (each storage once)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    return out, sum(storages.values())


def test_recompute_keeps_less_and_changes_nothing_else():
    """Recomputing in the backward pass gives the same outputs, gradients and batch-norm statistics
    (updated once, not twice) and keeps less than keeping everything."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=8, skip_strides=3)
    model.classifier[0].p = 0.0
    for module in model.modules():
        if isinstance(module, gpconv.layers.StochasticDepth):
            module.rate = 0.0
    x = torch.randn(2, 3, 32, 32, generator=generator)
    weights = torch.randn(2, 10, generator=generator)
    results = {}
    for mode in ("none", "l_layer", "all"):
        trained = gpconv.core.block.set_recompute(copy.deepcopy(model), mode)
        out, kept = saved_bytes(trained, x)
        (out * weights).sum().backward()
        results[mode] = (out.detach(), kept, {n: p.grad for n, p in trained.named_parameters()},
                         {n: b.clone() for n, b in trained.named_buffers()})
    out_none, kept_none, grads_none, buffers_none = results["none"]
    assert results["all"][1] < results["l_layer"][1] < kept_none
    for mode in ("l_layer", "all"):
        out, _, grads, buffers = results[mode]
        assert torch.allclose(out, out_none, atol=1e-5, rtol=1e-5), mode
        for name in grads_none:
            assert torch.allclose(grads[name], grads_none[name], atol=1e-4, rtol=1e-4), (mode, name)
        for name in buffers_none:
            assert torch.allclose(buffers[name].float(), buffers_none[name].float(), atol=1e-6), (mode, name)
    moved = [name for name, b in buffers_none.items() if name.endswith("running_mean")
             and not torch.equal(b, dict(model.named_buffers())[name])]
    assert moved  # the statistics did change (once) during the step


def test_recompute_names_are_checked():
    block = GroupedPointwiseConv2d(32, 16, 8)
    with pytest.raises(ValueError) as error:
        block.recompute = "sometimes"
    assert str(error.value) == "recompute must be one of all, l_layer, none, got 'sometimes'"
