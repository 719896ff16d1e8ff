"""GroupedPointwiseConv2d executes its plan exactly."""

import re

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from torch import nn

from gpconv import GroupedPointwiseConv2d
from gpconv.core.plan import PLAN_VERSIONS

shapes = dict(in_channels=st.integers(1, 48), out_channels=st.integers(1, 48), channels_per_group=st.integers(1, 12),
              version=st.sampled_from(PLAN_VERSIONS), l_layer=st.booleans())


def conv_weight_count(block):
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))


def randomize(block, generator):
    """Random weights, biases and batch-norm statistics, so that every term matters."""
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(generator=generator)
                if module.bias is not None:
                    module.bias.normal_(generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(generator=generator)
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


def layer_as_affine(layer_plan, layer_module, in_channels):
    """Compose one layer (K or L) into a dense matrix and offset, from the plan's index maps and the
    module's weights: path output o of group g reads input channel input_index[g*Ch + j] with w[o, j]."""
    rows, offsets = [], []
    for path, module in zip(layer_plan.paths, layer_module.paths):
        weight = module.conv.weight[:, :, 0, 0].double()
        matrix = torch.zeros(path.out_channels, in_channels, dtype=torch.float64)
        for o in range(path.out_channels):
            group = o // path.filters_per_group
            for j in range(path.channels_per_group):
                matrix[o, path.input_index[group * path.channels_per_group + j]] += weight[o, j]
        rows.append(matrix)
        offsets.append(module.conv.bias.double() if module.conv.bias is not None
                       else torch.zeros(path.out_channels, dtype=torch.float64))
    matrix, offset = torch.cat(rows), torch.cat(offsets)
    if isinstance(layer_module.bn, nn.BatchNorm2d):
        bn = layer_module.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        matrix = matrix * scale[:, None]
        offset = (offset - bn.running_mean.double()) * scale + bn.bias.double()
    return matrix, offset


def block_as_affine(block):
    plan = block.plan
    k_matrix, k_offset = layer_as_affine(plan.k, block.k, plan.in_channels)
    if plan.l is not None:
        order = list(plan.interleave) if plan.interleave is not None else list(range(plan.out_channels))
        l_matrix, l_offset = layer_as_affine(plan.l, block.l, plan.out_channels)
        return (l_matrix @ k_matrix[order] + k_matrix, l_matrix @ k_offset[order] + l_offset + k_offset)
    if plan.output_order is not None:
        order = list(plan.output_order)
        return k_matrix[order], k_offset[order]
    return k_matrix, k_offset


@settings(max_examples=60, deadline=None)
@given(**shapes, bias=st.booleans(), batch_norm=st.booleans(), seed=st.integers(0, 2**16))
@example(24, 48, 4, 1, True, False, True, 0)  # version 1 expansion: output keeps K's interleaved order
@example(14, 10, 4, 2, True, True, True, 1)  # Entropy 2022, Figure 1: both layers with two paths
def test_eval_block_equals_composed_dense_conv(in_channels, out_channels, channels_per_group, version, l_layer,
                                               bias, batch_norm, seed):
    generator = torch.Generator().manual_seed(seed)
    block = GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, version=version, l_layer=l_layer,
                                   bias=bias, batch_norm=batch_norm).double().eval()
    randomize(block, generator)
    matrix, offset = block_as_affine(block)
    x = torch.randn(2, in_channels, 3, 2, generator=generator, dtype=torch.float64)
    expected = torch.einsum("oi,nihw->nohw", matrix, x) + offset[None, :, None, None]
    for execution in ("straightforward", "fast"):
        block.execution = execution
        assert torch.allclose(block(x), expected, atol=1e-9, rtol=1e-9), execution


@settings(max_examples=60, deadline=None)
@given(**shapes, activation=st.sampled_from([None, "swish", "hard_swish"]), seed=st.integers(0, 2**16),
       batch_norm=st.booleans())
def test_shape_weight_count_and_gradients(in_channels, out_channels, channels_per_group, version, l_layer, activation,
                                          seed, batch_norm):
    # A bias right before a training-mode batch norm has an exactly zero gradient, so the SE-style
    # layout (bias, no batch norm) and the usual one (batch norm, no bias) are tested.
    generator = torch.Generator().manual_seed(seed)
    block = GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, version=version, l_layer=l_layer,
                                   activation=activation, bias=not batch_norm, batch_norm=batch_norm)
    assert conv_weight_count(block) == block.plan.weight_count
    parameters = sum(p.numel() for p in block.parameters())
    assert parameters == block.plan.parameter_count(batch_norm=batch_norm, bias=not batch_norm)
    x = torch.randn(3, in_channels, 4, 5, generator=generator)
    out = block(x)
    assert out.shape == (3, out_channels, 4, 5)
    (out * torch.randn(out.shape, generator=generator)).sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_reduction_layer_is_smaller_and_strided():
    block = GroupedPointwiseConv2d(1152, 320, 16, stride=2)
    assert block.plan.weight_count == 10_240
    assert block(torch.randn(1, 1152, 7, 7)).shape == (1, 320, 4, 4)


def test_module_activation_is_copied_per_layer():
    shared = nn.PReLU()
    block = GroupedPointwiseConv2d(14, 10, 4, activation=shared)
    activations = [block.k.act, block.l.act]
    assert all(isinstance(a, nn.PReLU) and a is not shared for a in activations)
    assert activations[0] is not activations[1]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(channels_per_group=0), ValueError, "channels_per_group must be >= 1"),
    (dict(channels_per_group=4.0), TypeError, "channels_per_group must be an int"),
    (dict(in_channels=0), ValueError, "in_channels must be >= 1"),
    (dict(out_channels=-2), ValueError, "out_channels must be >= 1"),
    (dict(activation="gelu"), ValueError, "unknown activation 'gelu'"),
    (dict(activation=3), TypeError, "activation must be"),
    (dict(version=0), ValueError, "version must be 1 or 2"),
])
def test_bad_arguments(kwargs, error, match):
    arguments = dict(in_channels=64, out_channels=32, channels_per_group=8) | kwargs
    with pytest.raises(error, match=match) as raised:
        GroupedPointwiseConv2d(**arguments)
    assert "\n" not in str(raised.value)


def test_wrong_input_channels():
    block = GroupedPointwiseConv2d(64, 32, 8)
    for shape in ((1, 63, 4, 4), (63, 4, 4), (64, 4), (1, 1, 64, 4, 4)):
        with pytest.raises(ValueError, match=r"^GroupedPointwiseConv2d expects an input of shape \(N, 64, H, W\) or "
                           r"\(64, H, W\), got " + re.escape(str(shape)) + "$"):
            block(torch.randn(*shape))
