"""ONNX Runtime's own profile of EfficientNet-B0 and kEffNet-B0 V2 16ch, per operator type, untuned vs tuned.

Not a test: run it on a quiet machine, e.g.

    .venv/bin/python benchmarks/ort_profile.py --setting 32-b64 --threads 2

Each model is exported as ``gpconv export`` does (its grouped blocks in prepare_for_inference's untimed rule)
and, for the k-model, also tuned for ONNX Runtime (``export_onnx(..., tune="onnxruntime")`` at the setting's
batch). Each file runs ``--runs`` times in ONNX Runtime with its profiler on (``enable_profiling``); the
kernel times of the nodes ONNX Runtime actually ran (after its graph optimizations and fusions) are summed
per operator type and divided by the runs: milliseconds per batch and the share of the file's total. It
prints the CPU first (its kind decides which kernels run, docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import describe_machine  # noqa: E402
from runtimes import MODELS, SETTINGS, build, export, images  # noqa: E402
from gpconv.export import onnx_session  # noqa: E402


def operator_times(path: Path, x: torch.Tensor, threads: int, runs: int, prefix: str) -> Counter:
    """Milliseconds per run of each operator type in ONNX Runtime's profile of ``path`` on ``x``."""
    session = onnx_session(path, threads, spinning=False, profile=prefix)
    array = x.numpy()
    session.run(None, {"images": array})  # the first run (allocations) is profiled too: it is left out below
    for _ in range(runs):
        session.run(None, {"images": array})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    first_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else -1
    times: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > first_end:
            times[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="32-b64", choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="profiled runs per file (after one left out)")
    parser.add_argument("--models", default="EfficientNet-B0,kEffNet-B0 V2 16ch", help="the first is the baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_machine())
    size, batch, skip = SETTINGS[args.setting]
    calibration, x = images(64, size), images(batch, size)
    columns = {}
    with tempfile.TemporaryDirectory(prefix="gpconv-ort-profile-") as folder:
        for name in args.models.split(","):
            model = build(MODELS[name], size, skip, calibration)
            path = export(model, Path(folder) / f"{name}.onnx", x, calibration)
            columns[name] = operator_times(path, x, args.threads, args.runs, f"{folder}/{len(columns)}")
            if MODELS[name] is not None:
                tuned = export(model, Path(folder) / f"{name}.tuned.onnx", x, calibration, tune="onnxruntime",
                               threads=args.threads)
                columns[f"{name} tuned"] = operator_times(tuned, x, args.threads, args.runs, f"{folder}/{len(columns)}")
    totals = {column: sum(times.values()) for column, times in columns.items()}
    operators = sorted(set().union(*columns.values()), key=lambda op: -max(c[op] for c in columns.values()))
    print(f"\n{size}x{size} batch {batch}: ONNX Runtime kernel ms per batch (share of the file's total), "
          f"{args.threads} threads, mean of {args.runs} runs")
    print("| operator | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for op in operators:
        print(f"| {op} | " + " | ".join(f"{c[op]:.1f} ({c[op] / totals[n]:.0%})" for n, c in columns.items()) + " |")
    print("| **total** | " + " | ".join(f"**{totals[n]:.1f}**" for n in columns) + " |")


if __name__ == "__main__":
    main()
