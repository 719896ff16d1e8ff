"""The fast execution equals the straightforward one."""

import copy

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import gpconv
from gpconv import GroupedPointwiseConv2d
from gpconv.core.block import set_execution
from gpconv.core.plan import PLAN_VERSIONS


def forward_backward(model, x, weights):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def force_layers(model, layer_form):
    """Fast execution with every grouped layer in ``layer_form`` ("merged" or "scattered")."""
    set_execution(model, "fast")
    for module in model.modules():
        if isinstance(module, gpconv.core.block.GroupedConvLayer):
            module.form = layer_form
    return model


def assert_same(model, x, generator, layer_form=None, weight_scale=1.0, out_tolerance=1e-5, grad_tolerance=1e-4):
    fast = set_execution(model, "fast") if layer_form is None else force_layers(model, layer_form)
    straightforward = set_execution(copy.deepcopy(model), "straightforward")
    weights = torch.randn(fast(x).shape, generator=generator, dtype=x.dtype) * weight_scale
    out_fast, grads_fast = forward_backward(fast, x, weights)
    out_straight, grads_straight = forward_backward(straightforward, x, weights)
    assert torch.allclose(out_fast, out_straight, atol=out_tolerance, rtol=out_tolerance)
    assert grads_fast.keys() == grads_straight.keys()
    for name in grads_straight:
        assert torch.allclose(grads_fast[name], grads_straight[name], atol=grad_tolerance, rtol=grad_tolerance), name


@settings(max_examples=40, deadline=None)
@given(in_channels=st.integers(1, 64), out_channels=st.integers(1, 64), channels_per_group=st.integers(1, 12),
       version=st.sampled_from(PLAN_VERSIONS), l_layer=st.booleans(), bias=st.booleans(),
       activation=st.sampled_from([None, "swish", "relu"]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 999))
@example(14, 10, 4, 2, True, True, "swish", 1, 0)
def test_fast_block_equals_straightforward(in_channels, out_channels, channels_per_group, version, l_layer, bias,
                                     activation, stride, seed):
    generator = torch.Generator().manual_seed(seed)
    block = GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, version=version, l_layer=l_layer,
                                   bias=bias, activation=activation, stride=stride).double()
    # float64: in float32 a pre-activation within rounding of relu's kink (both paths' sums differ in the last
    # bit) flips its gradient now and then; the same math must agree to far below float32 rounding
    x = torch.randn(3, in_channels, 5, 4, generator=generator, dtype=torch.float64)
    for layer_form in (None, "merged", "scattered"):  # the fast default, and each layer form forced
        assert_same(block, x, generator, layer_form, out_tolerance=1e-10, grad_tolerance=1e-9)


def test_fast_kefficientnet_b0_equals_straightforward():
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
        assert torch.allclose(set_execution(model, "fast")(x), set_execution(model, "straightforward")(x), atol=1e-5)


def test_execution_names_are_checked():
    block = GroupedPointwiseConv2d(32, 32, 8)
    with pytest.raises(ValueError) as error:
        block.execution = "turbo"
    assert str(error.value) == "execution must be one of fast, straightforward, got 'turbo'"
    # the old word is refused too, also by set_execution on a model with no grouped block at all
    with pytest.raises(ValueError) as error:
        set_execution(torch.nn.Conv2d(3, 3, 1), "reference")
    assert str(error.value) == "execution must be one of fast, straightforward, got 'reference'"
    with pytest.raises(ValueError) as error:
        block.k.form = "dense"  # a folded block's word, not a layer's
    assert str(error.value) == "layer form must be one of paths, merged, scattered, got 'dense'"
    assert block.execution == "fast" and block.k.form == block.k.fast_form


def test_executions_set_layer_forms():
    """"straightforward" runs every layer as paths; "fast" puts each back in its fast form: scattered
    where the dense matrix has at most LAYER_SCATTERED_MAC_RATIO (2.5) times the layer's weights."""
    assert gpconv.core.executions.LAYER_SCATTERED_MAC_RATIO == 2.5
    cases = {(32, 32, 8): ["merged", "merged"],  # 4 groups: 4x the weights
             (32, 32, 16): ["scattered"],  # 2 groups: 2x (and no L)
             (14, 10, 4): ["merged", "scattered"]}  # Entropy 2022 Figure 1: K 140 of 40 weights, L 100 of 40
    for shape, forms in cases.items():
        block = GroupedPointwiseConv2d(*shape)
        assert [layer.fast_form for layer in block.layers] == forms, shape
        set_execution(block, "straightforward")
        assert [layer.form for layer in block.layers] == ["paths"] * len(forms)
        set_execution(block, "fast")
        assert [layer.form for layer in block.layers] == forms


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
