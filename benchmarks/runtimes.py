"""EfficientNet-B0 vs kEffNet-B0 V2 16ch / 32ch in the runtimes a CPU deployment uses, side by side.

Not a test: run it on a quiet machine, e.g.

    nice -n 15 .venv/bin/python benchmarks/runtimes.py --threads 2

For each setting (224x224 batch 1 and 16; 32x32 batch 64 with ``skip_strides=3``) every model runs in

* ``torch eager``: the model in eval mode, NCHW, ``torch.inference_mode``;
* ``prepare_for_inference``: gpconv's inference form, timed on the batch (channels_last);
* ``ORT fp32``: ``gpconv.export_onnx`` (verified against torch) in ONNX Runtime;
* ``ORT int8``: that file quantized by ``gpconv.export.quantize_onnx`` (static, calibrated), ONNX Runtime;
* ``OpenVINO``: the fp32 ONNX file compiled by OpenVINO for the CPU at the batch's shape, in
  OpenVINO's default precision (bf16 on a CPU with AVX512-BF16 or AMX, else f32; printed at the top);
* ``OpenVINO f32``: the same with the precision set to f32;
* ``OpenVINO chunks of N`` (``--chunks``, default 4 and 16): the batch run in chunks of N images
  through ``gpconv.export.openvino_chunked``, one stream per thread (OpenVINO's throughput mode),
  default precision;
* ``OpenVINO int8`` (only when named in ``--runtimes``): the int8 file of ``ORT int8`` (QDQ),
  compiled by OpenVINO;
* ``OpenVINO NNCF int8`` (only when named; needs ``pip install nncf``, not a gpconv dependency):
  OpenVINO's own post-training int8 (NNCF, default preset) of the fp32 file, calibrated on the
  synthetic images;
* ``ORT fp32 tuned``, ``OpenVINO tuned`` (only when named in ``--runtimes``): the file exported with
  ``export_onnx(..., tune="onnxruntime")`` / ``tune="openvino"``, each grouped block in the form that
  runs fastest in that runtime on this CPU at the batch's shape (``gpconv export --tune``), run in that runtime;
* with ``--onnx-forms``, ``ORT fp32 FORM`` and ``OpenVINO FORM``: ONNX Runtime and OpenVINO with the
  grouped blocks exported in each other form of ``gpconv.export.ONNX_FORMS`` (how the default was chosen).

All of them alternate round by round (so that drifts of the machine hit all alike), with the same
thread count; ONNX Runtime's threads do not busy-wait between runs (they would slow down the next
runtime). Models get batch-norm statistics from synthetic images first (a fresh model's
activations shrink towards zero, which no deployment sees). It prints milliseconds per batch,
baseline / k-model ratios per runtime, each model's fastest runtime, and the ratio of the fastest
baseline to each model's fastest (> 1: the k-model is faster). Needs the deploy extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpconv  # noqa: E402
from benchmark import MALLOC_SETTINGS, alternate, describe_machine  # noqa: E402
from gpconv.experiments.data import ImageSet, make_synthetic, to_float  # noqa: E402
from gpconv.export import (ONNX_FORMS, cpu_description, onnx_session, openvino_chunked, openvino_compile,  # noqa: E402
                           openvino_default_precision, quantize_onnx, require_deploy, tuning_summary)
from gpconv.experiments.metrics import recalibrate_batch_norm  # noqa: E402

MODELS = {"EfficientNet-B0": None, "kEffNet-B0 V2 16ch": 16, "kEffNet-B0 V2 32ch": 32}
SETTINGS = {"224-b1": (224, 1, 0), "224-b16": (224, 16, 0), "32-b64": (32, 64, 3)}  # size, batch, skip_strides
RUNTIMES = ("torch eager", "prepare_for_inference", "ORT fp32", "ORT int8", "OpenVINO", "OpenVINO f32",
            "OpenVINO int8", "OpenVINO NNCF int8", "ORT fp32 tuned", "OpenVINO tuned")
# the tuned rows: the --tune runtime each is exported for
TUNED = {"ORT fp32 tuned": "onnxruntime", "OpenVINO tuned": "openvino"}


def images(count: int, size: int) -> torch.Tensor:
    """Synthetic images (gpconv's built-in dataset) as floats at ``size``x``size``."""
    batch = to_float(make_synthetic(count, seed=7).images)
    return batch if size == 32 else F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)


def build(channels_per_group, size, skip, calibration):
    torch.manual_seed(0)
    model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=channels_per_group, skip_strides=skip)
    data = ImageSet((calibration * 255).round().to(torch.uint8), torch.zeros(len(calibration), dtype=torch.long))
    recalibrate_batch_norm(model, data, batches=2, batch_size=32, device="cpu")
    return model.eval()


def openvino_function(path: Path, x: torch.Tensor, threads: int, precision=None):
    request = openvino_compile(path, tuple(x.shape), threads, precision).create_infer_request()
    array = x.numpy()
    return lambda: request.infer([array])


def nncf_int8_function(path: Path, x: torch.Tensor, calibration: torch.Tensor, threads: int):
    """OpenVINO running ``path`` quantized to int8 by NNCF (weights made constants first: NNCF reads them
    from constants, the exporter leaves some behind a Reshape)."""
    try:
        import nncf
    except ImportError:
        raise SystemExit("the OpenVINO NNCF int8 row needs nncf: pip install nncf") from None
    ov, passes = require_deploy("openvino"), require_deploy("openvino.passes")
    network = ov.Core().read_model(str(path))
    network.reshape({network.inputs[0].any_name: list(x.shape)})
    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(network)
    batches = [calibration[i:i + len(x)].numpy() for i in range(0, len(calibration) - len(x) + 1, len(x))]
    quantized = nncf.quantize(network, nncf.Dataset(batches or [x.numpy()]), subset_size=len(calibration))
    saved = path.with_name(path.stem + ".nncf-int8.xml")
    ov.save_model(quantized, str(saved))
    return openvino_function(saved, x, threads)


def export(model, path: Path, x, calibration, form: str = "rule", tune=None, threads=None) -> Path:
    """``path``, exported (and verified) the first time it is asked for; ``tune``: tuned for that runtime
    at ``x``'s shape with ``threads`` threads."""
    if not path.exists():
        result = gpconv.export_onnx(model, path, x if tune else x[:2], verify_input=calibration[:16], form=form,
                                    tune=tune, tune_threads=threads)
        if result.tuning:
            print(f"{path.name}: {tuning_summary(result.tuning)}", flush=True)
    return path


def runtime_functions(name, model, x, calibration, folder: Path, threads: int, runtimes):
    """{(runtime, model name): callable} for one model at one setting."""
    functions = {}
    if "torch eager" in runtimes:
        functions["torch eager"] = lambda: model(x)
    if "prepare_for_inference" in runtimes:
        prepared = gpconv.prepare_for_inference(model, example_input=x)
        x_last = x.contiguous(memory_format=torch.channels_last)
        functions["prepare_for_inference"] = lambda: prepared(x_last)
    if set(runtimes) <= {"torch eager", "prepare_for_inference"}:  # no ONNX file needed
        return {(runtime, name): function for runtime, function in functions.items()}
    fp32 = export(model, folder / f"{name}-{x.shape[-1]}.onnx", x, calibration)
    array = x.numpy()
    for runtime in runtimes:  # "ORT fp32 FORM", "OpenVINO FORM" (--onnx-forms): blocks exported in FORM
        form = runtime.split()[-1]
        if form not in ONNX_FORMS:
            continue
        if runtime.startswith(("ORT fp32 ", "OpenVINO ")):
            path = export(model, fp32.with_suffix(f".{form}.onnx"), x, calibration, form)
        if runtime.startswith("ORT fp32 "):
            session_form = onnx_session(path, threads, spinning=False)
            functions[runtime] = lambda session=session_form: session.run(None, {"images": array})
        elif runtime.startswith("OpenVINO "):
            functions[runtime] = openvino_function(path, x, threads)
    for runtime, tune in TUNED.items():
        if runtime in runtimes:
            path = export(model, fp32.with_suffix(f".{tune}-{len(x)}.onnx"), x, calibration, tune=tune, threads=threads)
            if tune == "onnxruntime":
                session_tuned = onnx_session(path, threads, spinning=False)
                functions[runtime] = lambda session=session_tuned: session.run(None, {"images": array})
            else:
                functions[runtime] = openvino_function(path, x, threads)
    if "ORT fp32" in runtimes:
        session = onnx_session(fp32, threads, spinning=False)
        functions["ORT fp32"] = lambda: session.run(None, {"images": array})
    int8 = fp32.with_name(fp32.stem + ".int8.onnx")
    if {"ORT int8", "OpenVINO int8"} & set(runtimes) and not int8.exists():
        quantize_onnx(fp32, int8, calibration)
    if "ORT int8" in runtimes:
        session8 = onnx_session(int8, threads, spinning=False)
        functions["ORT int8"] = lambda: session8.run(None, {"images": array})
    if "OpenVINO int8" in runtimes:  # OpenVINO reads the QDQ file and runs it with int8 kernels
        functions["OpenVINO int8"] = openvino_function(int8, x, threads)
    if "OpenVINO" in runtimes:
        functions["OpenVINO"] = openvino_function(fp32, x, threads)
    for runtime in runtimes:  # "OpenVINO chunks of N"
        if runtime.startswith("OpenVINO chunks of "):
            chunk = min(int(runtime.split()[-1]), len(x))
            chunked = openvino_chunked(fp32, chunk, tuple(x.shape[1:]), threads, streams=threads)
            functions[runtime] = lambda chunked=chunked: chunked(array)
    if "OpenVINO NNCF int8" in runtimes:
        functions["OpenVINO NNCF int8"] = nncf_int8_function(fp32, x, calibration, threads)
    if "OpenVINO f32" in runtimes:
        functions["OpenVINO f32"] = openvino_function(fp32, x, threads, "f32")
    return {(runtime, name): function for runtime, function in functions.items()}


def measure(setting, args, folder):
    size, batch, skip = SETTINGS[setting]
    calibration = images(64, size)
    x = images(batch, size)
    functions = {}
    for name in args.models:
        model = build(MODELS[name], size, skip, calibration)
        functions.update(runtime_functions(name, model, x, calibration, folder, args.threads, args.runtimes))
    iterations = max(1, args.iterations // batch)
    with torch.inference_mode():
        timings = alternate(functions, torch.device("cpu"), args.rounds, iterations)
    return {f"{runtime}|{name}": seconds for (runtime, name), seconds in timings.items()}


def report(setting, timings, models, runtimes):
    """Print milliseconds, ratios and each model's fastest runtime for one setting."""
    size, batch, skip = SETTINGS[setting]
    print(f"\n{size}x{size} batch {batch}" + (f" (skip_strides={skip})" if skip else "") + ": ms per batch on "
          + cpu_description())
    width = max(len(r) for r in runtimes) + 2
    print("".ljust(width) + "".join(m.rjust(22) for m in models) + "".join(f"  base/{MODELS[m]}ch" for m in models[1:]))
    for runtime in runtimes:
        ms = [timings[f"{runtime}|{m}"] * 1e3 for m in models]
        ratios = [f"{ms[0] / value:.2f}x".rjust(11) for value in ms[1:]]
        print(runtime.ljust(width) + "".join(f"{value:22.1f}" for value in ms) + "".join(ratios))
    best = {m: min(runtimes, key=lambda r: timings[f"{r}|{m}"]) for m in models}
    base = timings[f"{best[models[0]]}|{models[0]}"]
    for m in models:
        ratio = base / timings[f"{best[m]}|{m}"]
        print(f"fastest for {m}: {best[m]} ({timings[f'{best[m]}|{m}'] * 1e3:.1f} ms)"
              + ("" if m == models[0] else f"; fastest baseline / fastest {m}: {ratio:.2f}x"))


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):  # as benchmarks/benchmark.py
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_SETTINGS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch, ONNX Runtime and OpenVINO threads (default 2)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    parser.add_argument("--iterations", type=int, default=16, help="images per timed call (batches of N: N // batch)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, the first is the baseline")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES[:-4]),
                        help="comma-separated, of: " + ", ".join(RUNTIMES) + " (default: all but the last four)")
    parser.add_argument("--onnx-forms", action="store_true",
                        help="also time ONNX Runtime fp32 and OpenVINO with the grouped blocks exported in each form of "
                             "gpconv.export.ONNX_FORMS (the default export is 'rule')")
    parser.add_argument("--chunks", default="4,16",
                        help="comma-separated chunk sizes for the 'OpenVINO chunks of N' rows ('' for none)")
    parser.add_argument("--json", default=None, help="also write the timings (seconds) to this file")
    args = parser.parse_args()
    args.models, args.runtimes = args.models.split(","), args.runtimes.split(",")
    args.runtimes += [f"OpenVINO chunks of {int(chunk)}" for chunk in args.chunks.split(",") if chunk]
    if args.onnx_forms:
        args.runtimes += [f"{runtime} {form}" for runtime in ("ORT fp32", "OpenVINO")
                          for form in ONNX_FORMS if form != "rule"]
    torch.set_num_threads(args.threads)
    print(describe_machine(torch.device("cpu")) + f"; onnxruntime {require_deploy('onnxruntime').__version__}; "
          f"openvino {require_deploy('openvino').__version__.split('-')[0]}, "
          f"default precision {openvino_default_precision()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpconv-runtimes-") as folder:
        for setting in args.settings.split(","):
            results[setting] = measure(setting, args, Path(folder))
            report(setting, results[setting], args.models, args.runtimes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
