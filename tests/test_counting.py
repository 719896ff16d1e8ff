"""Counting rules on small hand-checkable models."""

import torch
from torch import nn

import gpconv
from gpconv import count_computations, count_macs, count_parameters


def test_macs_of_convolutions_and_linear():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1, groups=4, bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    expected = 6 * 6 * 8 * 3 * 9 + 6 * 6 * 8 * 2 + 8 * 5
    assert count_macs(model, (6, 6)) == expected


def test_computations_follow_the_tensorflow_profiler_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=True), nn.BatchNorm2d(4), nn.SiLU(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    elements = 4 * 5 * 5
    flops = (2 * elements * 3 + elements  # conv + bias add
             + 0                          # batch norm: not counted by the profiler
             + elements                   # swish: x * sigmoid(x), one Mul
             + 0                          # relu: not counted
             + elements                   # global average pool: Mean over its input
             + 2 * 4 * 2 + 2              # matmul + bias add
             + 5 * 2)                     # softmax of the classifier
    assert count_computations(model, 5) == flops // 2


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x):
        return self.conv(x) + x


def test_additions_are_free_and_multiplications_are_not():
    residual = Residual()
    assert count_computations(residual, (4, 3, 3), softmax_output=False) == 4 * 9 * 4  # conv only
    scaled = nn.Sequential(nn.Hardswish())
    assert count_computations(scaled, (2, 3, 3), softmax_output=False) == (2 * 18) // 2


def test_count_parameters_ignores_frozen_and_buffers():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    assert count_parameters(model) == 2 * 3 + 3 + 3 + 3
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 3 + 3 + 3


def test_counting_keeps_training_mode():
    model = gpconv.create_model("efficientnet_b0", channels_per_group=16, skip_strides=3)
    model.train()
    count_macs(model, 32)
    assert model.training
