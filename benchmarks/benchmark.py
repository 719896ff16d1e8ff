"""Side-by-side speed and memory of EfficientNet-B0 vs kEffNet-B0 V2 16ch / 32ch.

Not a test: run it on a quiet machine, e.g.

    .venv/bin/python benchmarks/benchmark.py --threads 2
    python3 benchmarks/benchmark.py --device cuda --amp --train-batch 256   # GPU, bf16 autocast

It measures, alternating the models round by round so that drifts hit all of them alike:

* inference latency (each model in its ``prepare_for_inference`` form) at 224x224 batch 1 and 16,
  and at 32x32 batch 64 with ``skip_strides=3``;
* training step time and images/s (forward, backward, RMSprop step; fast execution; channels_last unless
  ``--training-format contiguous``; ``--recompute`` as GroupedPointwiseConv2d.recompute) at 32x32 batch 64
  (``--train-batch``);
* with ``--amp``, everything under ``torch.autocast`` in ``--amp-dtype`` (bfloat16 by default, no loss
  scaling; float16 with a GradScaler);
* peak memory of a training step (peak RSS of a fresh process per model on CPU; max allocated on CUDA);
* the "Amdahl limit" of each inference setting: baseline time / (baseline time - time the baseline
  spends in its pointwise convolutions), measured with the profiler.

It prints the machine (the CPU's model and matrix/vector features, the GPU) and ratios baseline / k-model
(> 1 means the k-model is faster or smaller); ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
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
from gpconv.export import cpu_description  # noqa: E402

MODELS = {"EfficientNet-B0": None, "kEffNet-B0 V2 16ch": 16, "kEffNet-B0 V2 32ch": 32}
INFERENCE = [(224, 1, 0), (224, 16, 0), (32, 64, 3)]  # (input size, batch, skip_strides)
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_settings(text: str):
    """``"224x1,224x16,32x64s3"`` -> [(224, 1, 0), (224, 16, 0), (32, 64, 3)] (SIZExBATCH[sSKIP_STRIDES])."""
    settings = []
    for item in filter(None, text.split(",")):
        size_batch, _, skip = item.partition("s")
        size, _, batch = size_batch.partition("x")
        try:
            settings.append((int(size), int(batch), int(skip or 0)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not SIZExBATCH or SIZExBATCHsSKIP (e.g. 32x64s3)") from None
    return settings


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


def inference_functions(size, batch, skip, device, amp, timed=True, amp_dtype=torch.bfloat16):
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    functions = {}
    for name, channels_per_group in MODELS.items():
        model = prepare_for_inference(build(channels_per_group, skip).to(device), example_input=x if timed else None)

        def run(model=model):
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                model(x)
        functions[name] = run
    return functions


def training_functions(device, amp, channels_last=True, recompute="all", models=tuple(MODELS), batch=64, size=32,
                       amp_dtype=torch.bfloat16):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    functions = {}
    for name in models:
        model = build(MODELS[name], 3).to(device, memory_format=memory_format).train()
        set_recompute(model, recompute)
        optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)  # bf16: no scaling

        def step(model=model, optimizer=optimizer, scaler=scaler):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
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


def memory_child(channels_per_group, device_name, amp, channels_last, recompute, batch, amp_dtype):
    """Runs in a fresh process: peak memory of two training steps of one model."""
    device = torch.device(device_name)
    name = next(n for n, c in MODELS.items() if c == channels_per_group)
    step = training_functions(device, amp, channels_last, recompute, models=(name,), batch=batch, amp_dtype=amp_dtype)
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
                   "--recompute", args.recompute, "--train-batch", str(args.train_batch),
                   "--amp-dtype", args.amp_dtype] + (["--amp"] if args.amp else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
    return results


def describe_machine(device=torch.device("cpu")):
    """One line: the CPU (model, cores, matrix/vector features: gpconv.export.cpu_description), torch's
    threads and version, and the GPU when ``device`` is CUDA. Every timing script prints it first."""
    text = f"{cpu_description()}; {torch.get_num_threads()} torch threads, torch {torch.__version__}"
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
    parser.add_argument("--amp", action="store_true", help="mixed precision: torch.autocast in --amp-dtype")
    parser.add_argument("--amp-dtype", choices=list(AMP_DTYPES), default="bfloat16",
                        help="autocast dtype with --amp (default bfloat16, no loss scaling; float16 uses a GradScaler)")
    parser.add_argument("--settings", type=parse_settings, default=INFERENCE,
                        help="inference settings SIZExBATCH[sSKIP_STRIDES], comma-separated (default 224x1,224x16,32x64s3)")
    parser.add_argument("--train-batch", type=int, default=64, help="training batch at 32x32 (default 64)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
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
                     args.training_format == "channels_last", args.recompute, args.train_batch, AMP_DTYPES[args.amp_dtype])
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    print(f"machine: {describe_machine(device)}; malloc: "
          + ("glibc defaults" if args.system_malloc else " ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items())))
    amp_dtype = AMP_DTYPES[args.amp_dtype]
    print(f"training: {args.training_format}, k-models recompute={args.recompute!r}; inference: prepare_for_inference "
          + ("without an example batch" if args.no_example else "with an example batch")
          + (f"; autocast {args.amp_dtype}" if args.amp else "; float32"))
    names = list(MODELS)
    header = f"{'setting':34s}" + "".join(f"{name:>22s}" for name in names) + "   ratios (baseline / k)"
    print(header)
    figures = {"machine": describe_machine(device), "amp": args.amp_dtype if args.amp else None}
    parts = {args.only} if args.only else {"inference", "training"} | (set() if args.skip_memory else {"memory"})
    for size, batch, skip in args.settings if "inference" in parts else ():
        iterations = 10 if batch == 1 else 2
        times = alternate(inference_functions(size, batch, skip, device, args.amp, not args.no_example, amp_dtype),
                          device, args.rounds, iterations)
        base = times[names[0]]
        ratios = ", ".join(f"{base / times[n]:.2f}x" for n in names[1:])
        limit, share = amdahl_limit(size, batch, skip, device)
        print(f"{f'inference {size}x{size} batch {batch} (ms)':34s}" + "".join(f"{times[n] * 1e3:22.1f}" for n in names)
              + f"   {ratios}   (Amdahl limit {limit:.2f}x: pointwise = {share:.0%} of baseline time)")
        figures[f"inference {size}x{size} batch {batch} skip {skip} (ms)"] = {n: times[n] * 1e3 for n in names}
    if "training" in parts:
        batch = args.train_batch
        times = alternate(training_functions(device, args.amp, args.training_format == "channels_last", args.recompute,
                                             batch=batch, amp_dtype=amp_dtype), device, args.rounds, 1)
        base = times[names[0]]
        print(f"{f'training step 32x32 batch {batch} (ms)':34s}" + "".join(f"{times[n] * 1e3:22.1f}" for n in names)
              + "   " + ", ".join(f"{base / times[n]:.2f}x" for n in names[1:]))
        print(f"{'training images/s':34s}" + "".join(f"{batch / times[n]:22.1f}" for n in names))
        figures[f"training step 32x32 batch {batch} (ms)"] = {n: times[n] * 1e3 for n in names}
        figures["training images/s"] = {n: batch / times[n] for n in names}
    if "memory" in parts:
        peaks = peak_memory(device, args)
        kind = "max allocated" if device.type == "cuda" else "peak RSS"
        print(f"{f'training peak memory, {kind} (MiB)':34s}" + "".join(f"{peaks[n]:22.0f}" for n in names)
              + "   " + ", ".join(f"{peaks[names[0]] / peaks[n]:.2f}x" for n in names[1:]))
        figures[f"training peak memory, {kind} (MiB)"] = peaks
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")

if __name__ == "__main__":
    main()
