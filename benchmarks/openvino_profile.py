"""Where OpenVINO spends its time on EfficientNet-B0 vs kEffNet-B0 V2 16ch: per-operation-type CPU time
from OpenVINO's own profiling counters, summed over the compiled graph's nodes.

Not a test: run it on a quiet machine, e.g.

    .venv/bin/python benchmarks/openvino_profile.py --setting 32-b64 --threads 2

It exports both models as ``benchmarks/runtimes.py`` does (``gpconv.export_onnx``, batch-norm statistics
from synthetic images), compiles them with ``PERF_COUNT`` on, runs ``--runs`` inferences and prints, per
executed operation type (OpenVINO's ``exec_type`` names the kernel, ``node_type`` the operation), the
milliseconds per inference of each model and their difference: the rows where the k-model saves time,
and the rows both models share.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtimes import MODELS, SETTINGS, build, export, images  # noqa: E402
from gpconv.export import require_deploy  # noqa: E402


def profile(path: Path, x: torch.Tensor, threads: int, runs: int) -> dict:
    """{operation type: ms per inference} from OpenVINO's profiling counters."""
    ov = require_deploy("openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].any_name: list(x.shape)})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "PERF_COUNT": True})
    request = compiled.create_infer_request()
    array = x.numpy()
    request.infer([array])  # warm-up
    totals = defaultdict(float)
    for _ in range(runs):
        request.infer([array])
        for node in request.get_profiling_info():
            totals[node.node_type] += node.real_time.total_seconds() * 1e3 / runs
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="32-b64", choices=list(SETTINGS))
    parser.add_argument("--models", default="EfficientNet-B0,kEffNet-B0 V2 16ch", help="comma-separated, two")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    names = args.models.split(",")
    size, batch, skip = SETTINGS[args.setting]
    torch.set_num_threads(args.threads)
    calibration, x = images(64, size), images(batch, size)
    with tempfile.TemporaryDirectory(prefix="gpconv-ovprofile-") as folder:
        times = []
        for name in names:
            model = build(MODELS[name], size, skip, calibration)
            times.append(profile(export(model, Path(folder) / f"{name}.onnx", x, calibration), x, args.threads,
                                 args.runs))
    print(f"{size}x{size} batch {batch}" + (f" (skip_strides={skip})" if skip else "") +
          f": OpenVINO CPU time per inference by operation type, ms ({args.runs} runs, {args.threads} threads)")
    print(f"{'operation':24}" + "".join(f"{n:>22}" for n in names) + f"{'difference':>12}")
    kinds = sorted(set(times[0]) | set(times[1]), key=lambda k: -max(t.get(k, 0.0) for t in times))
    for kind in kinds:
        a, b = (t.get(kind, 0.0) for t in times)
        if max(a, b) >= 0.05:
            print(f"{kind:24}{a:22.2f}{b:22.2f}{a - b:12.2f}")
    a, b = (sum(t.values()) for t in times)
    print(f"{'total':24}{a:22.2f}{b:22.2f}{a - b:12.2f}   ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
