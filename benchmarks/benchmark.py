"""Side-by-side speed and memory of EfficientNet-B0 vs kEffNet-B0 V2 16ch / 32ch.

Not a test: run it on a quiet machine, e.g.

    .venv/bin/python benchmarks/benchmark.py --threads 2

It measures, alternating the models round by round so that drifts hit all of them alike:

* inference latency (each model in its ``prepare_for_inference`` form) at 224x224 batch 1 and 16,
  and at 32x32 batch 64 with ``skip_strides=3``;
* training step time (forward, backward, RMSprop step; fast execution; channels_last unless
  ``--training-format contiguous``; ``--recompute`` as GroupedPointwiseConv2d.recompute) at 32x32 batch 64;
* peak memory of a training step (peak RSS of a fresh process per model on CPU; max allocated on CUDA);
* the "Amdahl limit" of each inference setting: baseline time / (baseline time - time the baseline
  spends in its pointwise convolutions), measured with the profiler.

It prints ratios baseline / k-model (> 1 means the k-model is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpconv  # noqa: E402
from gpconv.core.block import RECOMPUTE, set_recompute  # noqa: E402
from gpconv.core.inference import prepare_for_inference  # noqa: E402

MODELS = {"EfficientNet-B0": None, "kEffNet-B0 V2 16ch": 16, "kEffNet-B0 V2 32ch": 32}
INFERENCE = [(224, 1, 0), (224, 16, 0), (32, 64, 3)]  # (input size, batch, skip_strides)


def build(channels_per_group, skip_strides):
    torch.manual_seed(0)
    return gpconv.create_model("efficientnet_b0", 10, channels_per_group=channels_per_group,
                               skip_strides=skip_strides)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(function, device, iterations):
    sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        function()
    sync(device)
    return (time.perf_counter() - started) / iterations


def alternate(functions, device, rounds, iterations):
    """Median seconds per call of each function, calling them in turn, round after round."""
    for _ in range(3):  # warm-up, alternating too: the heap grows to the models' joint pattern, after
        for function in functions.values():  # which large tensors stop page-faulting in; oneDNN caches
            function()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            samples[name].append(time_call(function, device, iterations))
    return {name: statistics.median(values) for name, values in samples.items()}


def inference_functions(size, batch, skip, device, amp, timed=True):
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    functions = {}
    for name, channels_per_group in MODELS.items():
        model = prepare_for_inference(build(channels_per_group, skip).to(device), example_input=x if timed else None)

        def run(model=model):
            with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
                model(x)
        functions[name] = run
    return functions


def training_functions(device, amp, channels_last=True, recompute="all", models=tuple(MODELS), batch=64, size=32):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    functions = {}
    for name in models:
        model = build(MODELS[name], 3).to(device, memory_format=memory_format).train()
        set_recompute(model, recompute)
        optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)

        def step(model=model, optimizer=optimizer, scaler=scaler):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        functions[name] = step
    return functions


def amdahl_limit(size, batch, skip, device):
    """Baseline time / (baseline time - time in its pointwise convolutions), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    model = prepare_for_inference(build(None, skip).to(device), example_input=x)
    with torch.inference_mode():
        model(x)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            model(x)
    total = pointwise = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        total += own
        shapes = event.input_shapes
        if event.key in ("aten::mkldnn_convolution", "aten::convolution", "aten::cudnn_convolution",
                         "aten::_convolution") and len(shapes) > 1 and len(shapes[1]) == 4:
            weight = shapes[1]
            if weight[2:] == [1, 1] and shapes[0] and weight[1] == shapes[0][1]:
                pointwise += own
        elif event.key in ("aten::addmm", "aten::mm") and shapes and shapes[-1] and shapes[-1][-1] != 10:
            pointwise += own  # squeeze-excitation 1x1 convolutions run as matrix products
    return total / (total - pointwise), pointwise / total


def memory_child(channels_per_group, device_name, amp, channels_last, recompute):
    """Runs in a fresh process: peak memory of two training steps of one model."""
    device = torch.device(device_name)
    name = next(n for n, c in MODELS.items() if c == channels_per_group)
    step = training_functions(device, amp, channels_last, recompute, models=(name,))
    before = _high_water_mark_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step[name]()
    step[name]()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _high_water_mark_mib()
    print(json.dumps({"peak_mib": peak, "before_step_mib": before}))


def _high_water_mark_mib() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited through
    fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device, args):
    results = {}
    for name, channels_per_group in MODELS.items():
        command = [sys.executable, __file__, "--memory-child", str(channels_per_group), "--device", device.type,
                   "--threads", str(args.threads), "--training-format", args.training_format,
                   "--recompute", args.recompute] + (["--amp"] if args.amp else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
    return results


def describe_machine(device):
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


# glibc hands large freed blocks back to the OS, so every forward pass page-faults its activations
# in again (about half of a CPU forward at 224x224). Keeping them in the heap removes that cost for
# every model alike; --system-malloc measures without it.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def main():
    if "--system-malloc" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_SETTINGS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per measurement")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--training-format", choices=["channels_last", "contiguous"], default="channels_last",
                        help="memory format of the training step (default channels_last, as gpconv train)")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="all",
                        help="what the k-models recompute in the backward pass (GroupedPointwiseConv2d.recompute)")
    parser.add_argument("--no-example", action="store_true",
                        help="prepare the inference models without an example batch (heuristic forms, no timing)")
    parser.add_argument("--only", choices=["inference", "training", "memory"], default=None,
                        help="run one part of the benchmark")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child is not None:
        memory_child(None if args.memory_child == "None" else int(args.memory_child), args.device, args.amp,
                     args.training_format == "channels_last", args.recompute)
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    print(f"machine: {describe_machine(device)}; malloc: "
          + ("glibc defaults" if args.system_malloc else " ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items())))
    print(f"training: {args.training_format}, k-models recompute={args.recompute!r}; inference: prepare_for_inference "
          + ("without an example batch" if args.no_example else "with an example batch"))
    names = list(MODELS)
    header = f"{'setting':34s}" + "".join(f"{name:>22s}" for name in names) + "   ratios (baseline / k)"
    print(header)
    parts = {args.only} if args.only else {"inference", "training"} | (set() if args.skip_memory else {"memory"})
    for size, batch, skip in INFERENCE if "inference" in parts else ():
        iterations = 10 if batch == 1 else 2
        times = alternate(inference_functions(size, batch, skip, device, args.amp, not args.no_example),
                          device, args.rounds, iterations)
        base = times[names[0]]
        ratios = ", ".join(f"{base / times[n]:.2f}x" for n in names[1:])
        limit, share = amdahl_limit(size, batch, skip, device)
        print(f"{f'inference {size}x{size} batch {batch} (ms)':34s}" + "".join(f"{times[n] * 1e3:22.1f}" for n in names)
              + f"   {ratios}   (Amdahl limit {limit:.2f}x: pointwise = {share:.0%} of baseline time)")
    if "training" in parts:
        times = alternate(training_functions(device, args.amp, args.training_format == "channels_last", args.recompute),
                          device, args.rounds, 1)
        base = times[names[0]]
        print(f"{'training step 32x32 batch 64 (ms)':34s}" + "".join(f"{times[n] * 1e3:22.1f}" for n in names)
              + "   " + ", ".join(f"{base / times[n]:.2f}x" for n in names[1:])
              + f"   ({64 / times[names[1]]:.0f} vs {64 / base:.0f} images/s for 16ch vs baseline)")
    if "memory" in parts:
        peaks = peak_memory(device, args)
        kind = "max allocated" if device.type == "cuda" else "peak RSS"
        print(f"{f'training peak memory, {kind} (MiB)':34s}" + "".join(f"{peaks[n]:22.0f}" for n in names)
              + "   " + ", ".join(f"{peaks[names[0]] / peaks[n]:.2f}x" for n in names[1:]))


if __name__ == "__main__":
    main()
