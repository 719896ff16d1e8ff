"""ONNX Runtime's time per batch for one model exported by each of PyTorch's two ONNX exporters.

``gpconv.export_onnx`` writes through the TorchScript-based exporter and falls back to the
``torch.export``-based one (``dynamo=True``). This script exports the same inference form both ways,
then times the two files in ONNX Runtime, alternating, and keeps the best of ``--rounds`` for each::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/exporter_compare.py --threads 2 --rounds 9

The CPU and its features are printed first. The TorchScript graph carries extra shape nodes for the
dynamic batch (Shape, Gather, Concat before each flatten); this measures whether they cost anything.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import describe_machine  # noqa: E402

import gpconv  # noqa: E402
from gpconv.export.exporter import _dynamo_proto, _torchscript_bytes, onnx_form  # noqa: E402

SETTINGS = {"224x224 b1": (224, 1, {}), "32x32 b64": (32, 64, {"skip_strides": 3})}


def exported_files(channels_per_group, size: int, options: dict) -> dict:
    """``{"torchscript": bytes, "dynamo": bytes}`` of EfficientNet-B0 (dense, or grouped) at ``size``."""
    model = gpconv.create_model("efficientnet_b0", num_classes=10, channels_per_group=channels_per_group,
                                **options).eval()
    form, example = onnx_form(model, "rule"), torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"torchscript": _torchscript_bytes(form, example, None),
                "dynamo": _dynamo_proto(form, example, None).SerializeToString()}


def best_times(files: dict, batch: int, size: int, threads: int, rounds: int) -> dict:
    """Best milliseconds per batch of each file, the files run in turn ``rounds`` times."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {name: onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                for name, data in files.items()}
    images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    best = {name: float("inf") for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {"images": images})
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(seconds * 1e3, 2) for name, seconds in best.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe_machine(torch.device("cpu")), flush=True)
    for label, channels_per_group in (("EfficientNet-B0", None), ("kEffNet-B0 V2 16ch", 16)):
        for setting, (size, batch, options) in SETTINGS.items():
            times = best_times(exported_files(channels_per_group, size, options), batch, size, args.threads,
                               args.rounds)
            print(f"{label:>20} {setting}: TorchScript exporter {times['torchscript']} ms, "
                  f"torch.export-based {times['dynamo']} ms", flush=True)


if __name__ == "__main__":
    main()
