"""On a CUDA GPU: the block, the model, inference folding, autocast and the training command give on the GPU
what they give on the CPU. Marked ``cuda`` (``pytest -m cuda``; benchmarks/gpu_check.sh runs them) and
skipped without a GPU."""

import copy
import json
import subprocess
import sys

import pytest
import torch

import gpconv
from gpconv import GroupedPointwiseConv2d
from gpconv.core.block import set_execution, set_recompute
from gpconv.layers import StochasticDepth

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def without_randomness(model):
    """``model`` in training mode with dropout and stochastic depth off (their random draws differ by device)."""
    model.train()
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, StochasticDepth)):
            module.eval()
    return model


def forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out.float() * weights).sum().backward()
    return out.detach().float().cpu(), {name: p.grad.detach().float().cpu() for name, p in model.named_parameters()}


def assert_close(cuda_result, cpu_result, tolerance):
    out_gpu, grads_gpu = cuda_result
    out_cpu, grads_cpu = cpu_result
    scale = max(1.0, float(out_cpu.abs().max()))
    assert torch.allclose(out_gpu, out_cpu, atol=tolerance * scale, rtol=tolerance)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name in grads_cpu:
        grad_scale = max(1.0, float(grads_cpu[name].abs().max()))
        assert torch.allclose(grads_gpu[name], grads_cpu[name], atol=tolerance * grad_scale, rtol=tolerance), name


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off: the comparisons below are of float32 results."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("execution", ["fast", "straightforward"])
@pytest.mark.parametrize("recompute", ["all", "none"])
@pytest.mark.parametrize("shape", [(64, 96, 16, 1), (48, 80, 8, 2), (96, 32, 32, 1)])  # in, out, per group, stride
def test_block_forward_and_backward_on_cuda_equal_the_cpu(execution, recompute, shape):
    in_channels, out_channels, per_group, stride = shape
    torch.manual_seed(0)
    block = GroupedPointwiseConv2d(in_channels, out_channels, per_group, stride=stride, activation="swish").train()
    set_recompute(set_execution(block, execution), recompute)
    x = torch.randn(4, in_channels, 9, 9)
    cpu = forward_backward(copy.deepcopy(block), x)
    gpu = forward_backward(copy.deepcopy(block).to(CUDA), x.to(CUDA).contiguous(memory_format=torch.channels_last))
    assert_close(gpu, cpu, 1e-4)


@pytest.mark.parametrize("channels_per_group", [None, 16, 32])
def test_model_training_step_on_cuda_equals_the_cpu(channels_per_group):
    torch.manual_seed(0)
    model = without_randomness(gpconv.create_model("efficientnet_b0", 10, channels_per_group=channels_per_group,
                                                   skip_strides=3))
    x = torch.randn(8, 3, 32, 32)
    cpu = forward_backward(copy.deepcopy(model), x)
    gpu = forward_backward(copy.deepcopy(model).to(CUDA, memory_format=torch.channels_last),
                           x.to(CUDA).contiguous(memory_format=torch.channels_last))
    assert_close(gpu, cpu, 5e-3)  # cuDNN and oneDNN sum in other orders through 80 layers and batch norms


@pytest.mark.parametrize("channels_per_group", [16, 32])
def test_prepare_for_inference_on_cuda_equals_the_eval_model(channels_per_group):
    torch.manual_seed(0)
    model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=channels_per_group, skip_strides=3)
    with torch.no_grad():  # batch norms with statistics of their own, not the identity
        model.train()(torch.randn(16, 3, 32, 32))
    model = model.eval().to(CUDA)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    prepared = gpconv.prepare_for_inference(model, example_input=x)
    forms = {m.execution for m in prepared.modules() if hasattr(m, "executions")}
    assert forms and forms <= {"grouped", "factored", "dense"}  # each block timed on the GPU and a form kept
    with torch.inference_mode():
        expected, got = model(x), prepared(x)
    assert got.device.type == "cuda"
    assert torch.allclose(got, expected, atol=1e-4 * max(1.0, float(expected.abs().max())), rtol=1e-4)


def test_bf16_autocast_training_step_on_cuda_follows_float32():
    """The benchmark's and a mixed-precision run's setting: channels_last, bf16 autocast, no loss scaling."""
    torch.manual_seed(0)
    model = without_randomness(gpconv.create_model("efficientnet_b0", 10, channels_per_group=16, skip_strides=3))
    model = model.to(CUDA, memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    reference = forward_backward(copy.deepcopy(model), x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = forward_backward(model, x)
    assert all(torch.isfinite(g).all() for g in grads.values())
    # bf16 keeps 8 bits of mantissa: the logits agree to a few per cent, not to float32's precision
    assert torch.allclose(out, reference[0], atol=0.1 * max(1.0, float(reference[0].abs().max())))
    assert torch.corrcoef(torch.stack([out.flatten(), reference[0].flatten()]))[0, 1] > 0.98


def test_gpconv_train_on_cuda_writes_a_run(tmp_path):
    command = [sys.executable, "-m", "gpconv", "train", "--arch", "efficientnet_b0", "--channels-per-group", "16",
               "--image-size", "32", "--skip-strides", "3", "--dataset", "synthetic", "--synthetic-size", "128,64",
               "--batch-size", "32", "--epochs", "2", "--device", "cuda", "--output", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_images"] == 64 and 0.0 <= metrics["test_accuracy"] <= 1.0
    checkpoint = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] >= 1  # written on the GPU, loaded on a CPU
