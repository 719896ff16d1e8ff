"""Where a training step's time goes: profiler self time per kind of operation, EfficientNet-B0 vs
kEffNet-B0 V2 16ch, one step each at 32x32 batch 64 (skip_strides=3). Not a test; run it on a quiet
machine:

    .venv/bin/python benchmarks/training_profile.py                # channels_last
    .venv/bin/python benchmarks/training_profile.py --contiguous   # NCHW

Convolutions are split into depthwise, dense 1x1 (``pointwise``), grouped 1x1 (``grouped 1x1``) and
the stem, forward and backward separately.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpconv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MALLOC_SETTINGS, describe_machine  # noqa: E402


def convolution_kind(event) -> str:
    backward = "backward" in event.key
    shapes = event.input_shapes
    weight, data = (shapes[2], shapes[1]) if backward else (shapes[1], shapes[0])
    if not weight or len(weight) != 4:
        return event.key
    if weight[2:] != [1, 1]:
        kind = "depthwise" if weight[1] == 1 else "stem"
    else:
        kind = "pointwise" if data and weight[1] == data[1] else "grouped 1x1"
    return f"{kind} conv {'backward' if backward else 'forward'}"


def profile_step(channels_per_group, memory_format):
    torch.manual_seed(0)
    model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=channels_per_group, skip_strides=3)
    model = model.train().to(memory_format=memory_format)
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (64,))
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    step()
    with torch.profiler.profile(record_shapes=True) as prof:
        step()
    times = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        key = event.key
        if key in ("aten::mkldnn_convolution", "aten::convolution_backward"):
            key = convolution_kind(event)
        elif key in ("aten::native_batch_norm", "aten::native_batch_norm_backward"):
            key = "batch norm " + ("backward" if "backward" in key else "forward")
        times[key] += event.self_cpu_time_total / 1e3
    return times


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_SETTINGS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_machine())
    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last
    results = {name: profile_step(cpg, memory_format) for name, cpg in (("EfficientNet-B0", None),
                                                                       ("kEffNet-B0 16ch", 16))}
    totals = {name: sum(times.values()) for name, times in results.items()}
    keys = sorted(set().union(*results.values()), key=lambda k: -max(r[k] for r in results.values()))
    print(f"{'operation (self CPU ms, share of step)':42s}" + "".join(f"{name:>24s}" for name in results))
    for key in keys[:16]:
        print(f"{key:42s}" + "".join(f"{results[n][key]:15.0f} ({results[n][key] / totals[n]:4.0%})" for n in results))
    print(f"{'total':42s}" + "".join(f"{totals[n]:15.0f}       " for n in results))


if __name__ == "__main__":
    main()
