"""Latency beside accuracy (issue 25): every variant of a study, timed in its fastest runtime.

Not a test: run it on a quiet machine. For the variants of finished runs (run or sweep folders, as
``gpconv report`` takes them; one model per variant, its ``config.json``):

    nice -n 15 .venv/bin/python benchmarks/study_latency.py docs/results/cpu_cifar10_subset_runs \\
        --threads 2 --output docs/results/cpu_cifar10_subset_latency.csv

or for models named on the command line (``ARCH:VARIANT[:WIDTH]``; how the thinning study's
latency-matched width was chosen):

    nice -n 15 .venv/bin/python benchmarks/study_latency.py --image-size 32 --skip-strides 1 \\
        --models efficientnet_b0:v2-16ch,efficientnet_b0:baseline:0.5,efficientnet_b0:baseline:0.75 \\
        --output /tmp/latency.csv

The variants of one architecture (a study's baseline and its k-models and widths) are timed side by side,
alternating; architectures are timed one after another, so that only one family's models are held in
memory at once (the families study's six models in four runtimes at once took more than 20 GiB).
Two settings are measured, side by side in one run: the study's input size (each run's
``image_size`` and ``skip_strides``) at batch 64, and 224x224 at batch 1 with no stride skipped (the
deployment setting of the papers' models). In each setting every model runs in every runtime of
``--runtimes`` (``benchmarks/runtimes.py``'s: torch eager, gpconv's ``prepare_for_inference``, ONNX
Runtime fp32, OpenVINO in its default precision and in f32; the int8 runtimes only when named, they
change the model's accuracy), all alternating round by round with the same thread count; the median
of the rounds is kept. A model's latency is its time per batch in its fastest runtime. Weights are
fresh, with batch-norm statistics from synthetic images (as runtimes.py: a time does not depend on
the trained values).

The CSV (written atomically; ``gpconv report --latency FILE`` reads it) has one row per variant:
``variant``, ``runtime``, ``latency_ms_b64``, ``runtime_b1``, ``latency_ms_b1`` (milliseconds per
batch), then the milliseconds of every runtime in both settings and the machine. Needs the deploy
extra for the ONNX Runtime and OpenVINO rows.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MALLOC_SETTINGS, alternate, describe_machine  # noqa: E402
from runtimes import images, runtime_functions  # noqa: E402
from gpconv.experiments.config import ModelConfig  # noqa: E402
from gpconv.experiments.data import ImageSet  # noqa: E402
from gpconv.experiments.metrics import recalibrate_batch_norm  # noqa: E402
from gpconv.experiments.paper_numbers import parse_variant  # noqa: E402
from gpconv.experiments.results import LATENCY_FIELDS, collect_runs  # noqa: E402
from gpconv.experiments.run_folder import read_run_config  # noqa: E402
from gpconv.io import atomic_write_text, claim_outputs  # noqa: E402

# fp32 runtimes of benchmarks/runtimes.py: the same model, the same accuracy
DEFAULT_RUNTIMES = ("torch eager", "prepare_for_inference", "ORT fp32", "OpenVINO", "OpenVINO f32")
SETTINGS = ("b64", "b1")


def study_variants(paths) -> dict:
    """``{variant: ModelConfig}`` of the runs in ``paths`` (the first run of each variant)."""
    variants = {}
    for run in collect_runs(paths):
        if run.variant not in variants:
            if not (run.folder / "config.json").is_file():
                raise SystemExit(f"error: {run.folder} has no config.json: its model cannot be rebuilt")
            variants[run.variant] = ModelConfig.from_dict(read_run_config(run.folder / "config.json")["model"])
    return variants


def named_variants(text: str, image_size: int, skip_strides: int) -> dict:
    """``{variant: ModelConfig}`` of ``ARCH:VARIANT[:WIDTH],...`` (variant names as ``gpconv sweep`` gives
    them: ``baseline-w0.5``)."""
    variants = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        arch, variant, *width = item.split(":")
        width = float(width[0]) if width else 1.0
        parsed = parse_variant(variant)
        name = variant + ("" if width == 1.0 else f"-w{width:g}")
        variants[name] = ModelConfig(arch, channels_per_group=parsed.channels_per_group, version=parsed.version,
                                     l_layer=parsed.l_layer, activation=parsed.activation, skip_strides=skip_strides,
                                     image_size=image_size, width=width)
    return variants


def build(config: ModelConfig, calibration: torch.Tensor) -> torch.nn.Module:
    """``config``'s model, fresh weights (seed 0), batch-norm statistics from ``calibration``, eval mode."""
    torch.manual_seed(0)
    model = config.build()
    data = ImageSet((calibration * 255).round().to(torch.uint8), torch.zeros(len(calibration), dtype=torch.long))
    recalibrate_batch_norm(model, data, batches=2, batch_size=32, device="cpu")
    return model.eval()


def setting_config(config: ModelConfig, setting: str, deploy_size: int) -> ModelConfig:
    """The model of ``setting``: the study's (``b64``) or at ``deploy_size`` with no stride skipped (``b1``)."""
    return config if setting == "b64" else replace(config, image_size=deploy_size, skip_strides=0)


def measure(variants: dict, setting: str, args, folder: Path) -> dict:
    """``{variant: {runtime: seconds per batch}}`` in one setting, all variants and runtimes alternating."""
    batch = args.batch if setting == "b64" else 1
    functions = {}
    for variant, config in variants.items():
        config = setting_config(config, setting, args.deploy_size)
        calibration = images(64, config.image_size)
        model = build(config, calibration)
        x = images(batch, config.image_size)
        functions.update(runtime_functions(variant, model, x, calibration, folder, args.threads, args.runtimes))
    with torch.inference_mode():
        timings = alternate(functions, torch.device("cpu"), args.rounds, max(1, args.iterations // batch))
    result = {variant: {} for variant in variants}
    for (runtime, variant), seconds in timings.items():
        result[variant][runtime] = seconds
    return result


def latency_rows(variants: dict, timings: dict, runtimes, machine: str) -> list:
    """One row per variant: the fastest runtime and its milliseconds in each setting, then every runtime's."""
    rows = []
    for variant in variants:
        row = {"variant": variant}
        for setting, runtime_key, latency_key in (("b64", "runtime", "latency_ms_b64"), ("b1", "runtime_b1",
                                                                                       "latency_ms_b1")):
            measured = timings[setting][variant]
            fastest = min(measured, key=measured.get)
            row[runtime_key], row[latency_key] = fastest, f"{measured[fastest] * 1e3:.3f}"
        for setting in SETTINGS:
            row.update({f"{runtime} {setting} ms": f"{timings[setting][variant][runtime] * 1e3:.3f}"
                        for runtime in runtimes})
        row["machine"] = machine
        rows.append(row)
    return rows


def to_csv(rows: list, runtimes) -> str:
    columns = list(LATENCY_FIELDS) + [f"{runtime} {setting} ms" for setting in SETTINGS for runtime in runtimes]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns + ["machine"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run or sweep folders (as gpconv report)")
    parser.add_argument("--models", default=None, help="instead of RUN_DIRs: ARCH:VARIANT[:WIDTH],... at --image-size")
    parser.add_argument("--image-size", type=int, default=32, help="--models only: the study's input size (32)")
    parser.add_argument("--skip-strides", type=int, default=1, help="--models only: the study's skip_strides (1)")
    parser.add_argument("--output", required=True, help="the latency CSV")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier latency CSV")
    parser.add_argument("--threads", type=int, default=2, help="torch, ONNX Runtime and OpenVINO threads (2)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is kept (7)")
    parser.add_argument("--iterations", type=int, default=64, help="images per timed call (64: one batch of 64)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the study-size setting (64)")
    parser.add_argument("--deploy-size", type=int, default=224, help="input size of the batch-1 setting (224)")
    parser.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES),
                        help="comma-separated runtimes of benchmarks/runtimes.py (default: " +
                             ", ".join(DEFAULT_RUNTIMES) + ")")
    args = parser.parse_args(argv)
    args.runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    if bool(args.runs) == bool(args.models):
        parser.error("give RUN_DIRs or --models, not both")
    return args


def main(argv=None):
    if any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):  # as benchmarks/benchmark.py
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_SETTINGS})
    args = parse_args(argv)
    output = Path(args.output)
    claim_outputs(output.parent, [output.name], overwrite=args.overwrite, option="--output")
    variants = study_variants(args.runs) if args.runs else named_variants(args.models, args.image_size,
                                                                          args.skip_strides)
    torch.set_num_threads(args.threads)
    machine = describe_machine(torch.device("cpu"))
    print(machine, flush=True)
    families = {}
    for variant, config in variants.items():
        families.setdefault(config.arch, {})[variant] = config
    timings = {setting: {} for setting in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="gpconv-study-latency-") as folder:
        for arch, family in families.items():  # one family's models held at once
            for setting in SETTINGS:
                (Path(folder) / arch / setting).mkdir(parents=True)
                timings[setting].update(measure(family, setting, args, Path(folder) / arch / setting))
                gc.collect()
    rows = latency_rows(variants, timings, args.runtimes, machine)
    atomic_write_text(output, to_csv(rows, args.runtimes))
    first = rows[0]
    for row in rows:
        print(f"{row['variant']:>28}: {row['latency_ms_b64']:>9} ms per batch of {args.batch} ({row['runtime']}), "
              f"{row['latency_ms_b1']:>8} ms at {args.deploy_size}x{args.deploy_size} batch 1 ({row['runtime_b1']}); "
              f"{float(row['latency_ms_b64']) / float(first['latency_ms_b64']):.2f}x the first's batch-64 time")
    print(output)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # bad input: one line
        raise SystemExit(f"error: {error}") from None
