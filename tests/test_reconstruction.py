"""Block reconstruction (gpconv/core/reconstruction.py): which blocks, what it lowers, what it keeps."""

import copy

import pytest
import torch
from torch import nn

import gpconv
from conftest import with_batch_norm_statistics
from gpconv.core.fit import fit_to_dense
from gpconv.core.reconstruction import _unique_grouped, default_blocks, reconstruct_blocks


class Residual(nn.Module):
    """An inverted-residual unit: 1x1 expand, batch norm, ReLU, 1x1 project, batch norm, plus the input."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn2(self.project(torch.relu(self.bn1(self.expand(x)))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(Residual(16, 48), Residual(16, 48), Residual(16, 48))
        self.head = nn.Linear(16, 32)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


class WithSpare(nn.Module):
    """A model holding a 1x1 layer its forward never calls."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.spare = net, nn.Conv2d(32, 32, 1)

    def forward(self, x):
        return self.net(x)


def _batches(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return with_batch_norm_statistics(Net(), _batches(4, 1))


def test_default_blocks_are_the_units_of_a_sequential_trunk(dense):
    assert default_blocks(gpconv.convert(dense, 8)) == ["blocks.0", "blocks.1", "blocks.2"]  # the stem: 3x3
    assert default_blocks(gpconv.convert(dense, 8, linear=True)) == ["blocks.0", "blocks.1", "blocks.2", "head"]


def test_default_blocks_look_through_a_third_party_trunk_and_cover_every_grouped_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[32, 64], depths=[2, 2])
    converted = gpconv.convert(transformers.ResNetForImageClassification(config).eval(), 8, exclude=["classifier"])
    names = default_blocks(converted)
    assert names and not any(name in ("resnet", "resnet.encoder", "resnet.encoder.stages") for name in names)
    covered = [id(m) for name in names for m in _unique_grouped(converted.get_submodule(name))]
    assert sorted(covered) == sorted(id(m) for m in _unique_grouped(converted))  # each grouped layer once


def test_reconstruction_lowers_the_composed_error_on_held_out_images(dense):
    fitted = gpconv.convert(dense, 8, linear=True)
    calibration = _batches(8, 2)
    fit_to_dense(dense, fitted, calibration, steps=10)
    reconstructed = copy.deepcopy(fitted)
    results = reconstruct_blocks(dense, reconstructed, calibration, steps=60, lr=3e-3, batch_size=32)
    assert [r.name for r in results] == ["blocks.0", "blocks.1", "blocks.2", "head"]  # a linear block too
    assert all(r.relative_error <= r.initial_error for r in results)
    assert sum(r.relative_error for r in results) < sum(r.initial_error for r in results)
    held_out = _batches(4, 99)
    with torch.no_grad():
        want = torch.cat([dense(b) for b in held_out])
        per_layer = torch.cat([fitted.eval()(b) for b in held_out])
        blockwise = torch.cat([reconstructed.eval()(b) for b in held_out])
    assert (blockwise - want).pow(2).sum() < (per_layer - want).pow(2).sum()


def test_a_block_that_is_exact_or_would_get_worse_is_kept_as_it_is(dense):
    converted = gpconv.convert(dense, 8, linear=True)
    same = copy.deepcopy(converted)  # the "dense" model is the converted one itself: every block is exact
    before = {key: value.clone() for key, value in converted.state_dict().items()}
    results = reconstruct_blocks(same, converted, _batches(2, 3), steps=20, lr=1e-2)
    assert all(r.initial_error == r.relative_error == 0.0 for r in results)
    assert all(torch.equal(before[key], value) for key, value in converted.state_dict().items())
    fit_to_dense(dense, converted, _batches(4, 5), steps=5)
    before = {key: value.clone() for key, value in converted.state_dict().items()}
    results = reconstruct_blocks(dense, converted, _batches(2, 3), steps=3, lr=50.0)  # steps far too large
    assert all(r.relative_error == r.initial_error > 0 for r in results)
    assert all(torch.equal(before[key], value) for key, value in converted.state_dict().items())


def test_named_blocks_are_checked_and_the_dense_model_is_not_changed(dense):
    converted = gpconv.convert(dense, 8)
    state = {key: value.clone() for key, value in dense.state_dict().items()}
    with torch.no_grad():  # training the block needs gradients all the same
        results = reconstruct_blocks(dense, converted, _batches(2, 4), blocks=["blocks.1"], steps=5, lr=1e-2)
    assert [r.name for r in results] == ["blocks.1"] and results[0].relative_error < results[0].initial_error
    assert all(torch.equal(state[key], value) for key, value in dense.state_dict().items())
    assert not dense.training and not converted.training
    with pytest.raises(ValueError, match="no block named 'blocks.9'"):
        reconstruct_blocks(dense, converted, _batches(1, 4), blocks=["blocks.9"])
    with pytest.raises(TypeError, match="re-iterable"):
        reconstruct_blocks(dense, converted, iter(_batches(1, 4)))
    with pytest.raises(ValueError, match="calibration data is empty"):
        reconstruct_blocks(dense, converted, [])
    with_spare = WithSpare(dense)
    with pytest.raises(ValueError, match="block 'spare' was not run"):  # a layer the forward never calls
        reconstruct_blocks(with_spare, gpconv.convert(with_spare, 8), _batches(1, 4), blocks=["spare"])


def test_a_transformers_model_is_reconstructed_through_convert_and_fit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1])
    dense = transformers.ResNetForImageClassification(config).eval()
    images = torch.randn(32, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(32).long()), batch_size=16)
    held_out = torch.randn(8, 3, 32, 32)
    errors = {}
    for block_steps in (0, 40):
        torch.manual_seed(1)
        converted, _ = gpconv.convert_and_fit(dense, loader, 8, exclude=["classifier"], steps=5,
                                              block_steps=block_steps)
        with torch.no_grad():
            errors[block_steps] = (converted.eval()(held_out).logits - dense(held_out).logits).pow(2).sum().item()
    assert errors[40] < errors[0]


class Shifted(nn.Module):
    """A block called with a keyword and a tensor shared by the whole batch, returning a tuple (as transformers
    layers do)."""

    def __init__(self):
        super().__init__()
        self.unit = Residual(16, 48)

    def forward(self, x, shift=None):
        return (self.unit(x) + shift, x.mean())


class SharedInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.first, self.second = Shifted(), Shifted()
        self.register_buffer("shift", torch.linspace(-1, 1, 16).view(1, 16, 1, 1))

    def forward(self, x):
        x = self.first(torch.relu(self.stem(x)), shift=self.shift)[0]
        return self.second(x, shift=self.shift)[0].mean((2, 3))


def test_shared_arguments_keywords_and_tuple_outputs_pass_through():
    torch.manual_seed(0)
    dense = SharedInputs().eval()
    converted = gpconv.convert(dense, 8)
    fit_to_dense(dense, converted, _batches(4, 6), steps=5)
    results = reconstruct_blocks(dense, converted, _batches(4, 6), steps=30, lr=3e-3, batch_size=24)
    assert [r.name for r in results] == ["first", "second"]
    assert all(r.relative_error < r.initial_error for r in results)


class Tokens(nn.Module):
    """Sequences of 7 tokens; each block gets a position embedding as long as a batch (a parameter), or its copy."""

    def __init__(self, copy_positions: bool):
        super().__init__()
        self.embed = nn.Linear(5, 32)
        self.positions = nn.Parameter(torch.randn(7, 32))
        self.first, self.second = Mlp(), Mlp()
        self.copy_positions = copy_positions

    def forward(self, x):
        positions = self.positions * 1.0 if self.copy_positions else self.positions
        return self.second(self.first(self.embed(x), positions), positions).mean(1)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, positions):
        return x + self.fc2(torch.relu(self.fc1(x + positions)))


@pytest.mark.parametrize("copy_positions", [False, True])
def test_a_shared_tensor_as_long_as_a_batch_is_not_taken_for_samples(copy_positions):
    torch.manual_seed(0)
    dense = Tokens(copy_positions).eval()
    converted = gpconv.convert(dense, 8, linear=True, exclude=["embed"])
    calibration = [torch.randn(7, 7, 5) for _ in range(3)]  # 7 sequences per batch, 7 positions
    results = reconstruct_blocks(dense, converted, calibration, steps=20, lr=3e-3, batch_size=4)
    assert [r.name for r in results] == ["first", "second"]
    assert all(r.relative_error < r.initial_error for r in results)


def test_arguments_it_cannot_run_with_are_one_line_errors(dense):
    converted = gpconv.convert(dense, 8)
    batches = _batches(2, 4)
    cases = [(dict(steps=-1), ValueError, "steps must be >= 0"), (dict(batch_size=0), ValueError, "batch_size >= 1"),
             (dict(lr=-1.0), ValueError, "lr >= 0"), (dict(blocks="blocks.1"), TypeError, r"write \['blocks.1'\]"),
             (dict(blocks=["blocks.1", "blocks.1"]), ValueError, "named twice")]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            reconstruct_blocks(dense, converted, batches, **options)
    with pytest.raises(TypeError, match="not one tensor"):
        reconstruct_blocks(dense, converted, torch.randn(8, 3, 8, 8))
    other = Net().eval()
    other.blocks[1] = nn.Conv2d(16, 24, 1)  # a model the converted one was not made from: 24 channels out
    with pytest.raises(ValueError, match=r"block 'blocks.1' gives \(32, 16, 8, 8\) .* \(32, 24, 8, 8\) in the dense"):
        reconstruct_blocks(other, converted, batches, blocks=["blocks.1"])
    with pytest.raises(ValueError, match="block_steps must be >= 0"):
        gpconv.convert_and_fit(dense, batches, 8, block_steps=-1)
