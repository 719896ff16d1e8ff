"""Per-layer inference times: each grouped block of kEffNet-B0 (``prepare_for_inference`` form, with the
form and group factors it chose) next to the dense 1x1 convolution + batch norm + activation it
replaces in EfficientNet-B0 (also prepared), each on the input it receives. Not a test; run it on a
quiet machine:

    .venv/bin/python benchmarks/block_times.py --size 224 --batch 16

It shows where the k-model's savings are (the 14x14 and 7x7 stages) and where there are none to have
(at 16 channels per group, the 112x112 and 56x56 layers are dense or nearly so in both models).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpconv  # noqa: E402
from gpconv.core.inference import FoldedGroupedPointwiseConv2d, prepare_for_inference  # noqa: E402
from gpconv.core.timing import _seconds as best_seconds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MALLOC_SETTINGS, describe_machine  # noqa: E402


def block_inputs(model, x):
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0]))
             for name, m in model.named_modules() if isinstance(m, FoldedGroupedPointwiseConv2d)]
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def best_ms(function, repeats=5):
    """Best of ``repeats`` timed calls after a warm-up, in milliseconds (prepare_for_inference's timer)."""
    return best_seconds(function, repeats) * 1e3


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_SETTINGS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-strides", type=int, default=0)
    parser.add_argument("--channels-per-group", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    base = prepare_for_inference(gpconv.create_model("efficientnet_b0", 10, skip_strides=args.skip_strides), x)
    k_model = prepare_for_inference(gpconv.create_model("efficientnet_b0", 10, channels_per_group=args.channels_per_group,
                                                        skip_strides=args.skip_strides), x)
    base_layers = dict(base.named_modules())
    print(describe_machine())
    print(f"{'block':20s} {'in->out':>10s} {'map':>9s} {'k-model form':36s} {'k ms':>7s} {'dense ms':>9s} {'ratio':>6s}")
    totals = [0.0, 0.0]
    with torch.inference_mode():
        for name, x_block in block_inputs(k_model, x).items():
            if x_block.shape[-1] * x_block.shape[-2] == 1:
                continue  # squeeze-excitation: matrix products in both models
            block, dense = dict(k_model.named_modules())[name], base_layers[name]
            k_ms, dense_ms = best_ms(lambda: block(x_block)), best_ms(lambda: dense(x_block))
            totals[0] += k_ms
            totals[1] += dense_ms
            form = block.extra_repr().split("folded, ")[1]
            print(f"{name:20s} {block.in_channels:>4d}->{block.out_channels:<5d} {str(tuple(x_block.shape[2:])):>9s} "
                  f"{form:36s} {k_ms:7.2f} {dense_ms:9.2f} {dense_ms / k_ms:5.2f}x")
    print(f"{'all pointwise layers':20s} {'':10s} {'':9s} {'':36s} {totals[0]:7.1f} {totals[1]:9.1f} "
          f"{totals[1] / totals[0]:5.2f}x")


if __name__ == "__main__":
    main()
