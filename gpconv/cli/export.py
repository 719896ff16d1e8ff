"""The ``export`` subcommand of ``gpconv`` (registered by :func:`add_export_command`).

``gpconv export ARCH|--checkpoint RUN/best.pt --format onnx [--int8]`` writes a verified ONNX file
(see :mod:`gpconv.export`). With ``--int8`` it also writes ``NAME.int8.onnx``, calibrated on training
images, and prints the test accuracy of torch, ONNX Runtime fp32 and ONNX Runtime int8 side by side:
that line is the int8 accuracy report, re-runnable on any checkpoint. With ``--openvino`` it runs the
file in OpenVINO, in OpenVINO's default precision for this CPU (bf16 where the CPU has it) and in f32,
and prints each one's largest difference from torch and its test accuracy. With ``--tune RUNTIME[:PRECISION]``
each grouped block's form is timed in that runtime (onnxruntime, openvino) at ``--tune-batch`` and the
fastest exported (:func:`gpconv.export.tune_for_runtime`); the choice is printed and recorded in the file.

A checkpoint is verified, calibrated and evaluated on its run's own splits (the dataset, data folder,
seed and synthetic size it was trained with: the helper ``gpconv evaluate`` and ``gpconv cam`` use),
so the torch accuracy printed is ``gpconv evaluate``'s and no test image is used for calibration. ``ARCH``
builds the model ``gpconv train --arch ARCH`` builds with the same options (their defaults are
:class:`~gpconv.experiments.config.ModelConfig`'s). Both files follow the output rule: an existing
file is refused unless ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from ..experiments import DATASETS
from ..models import list_models
from ..experiments.config import int_at_least, positive_float, positive_int
from .train import MODEL_OPTIONS, add_model_arguments

__all__ = ["add_export_command", "run_export", "runtime_accuracy"]

# options that describe an untrained ARCH; a checkpoint brings its own
ARCH_OPTIONS = MODEL_OPTIONS + ("num_classes",)


def add_export_command(commands) -> None:
    """Add ``export`` to the ``gpconv`` subparsers ``commands``."""
    import argparse

    from ..export import MIN_VERIFY_IMAGES

    export = commands.add_parser("export", help="export a model to ONNX (optionally int8), verified against torch")
    export.add_argument("arch", nargs="?", default=None, choices=list_models(), metavar="ARCH",
                        help="an untrained model (one of: " + ", ".join(list_models()) + "); or --checkpoint")
    export.add_argument("--checkpoint", default=None, help="a trained gpconv checkpoint (RUN/best.pt)")
    export.add_argument("--format", default="onnx", choices=("onnx",))
    export.add_argument("--output", default=None,
                        help="the .onnx file (default: beside the checkpoint, or ARCH[-VARIANT].onnx here)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace the .onnx (and .int8.onnx) files of an earlier gpconv export")
    export.add_argument("--int8", action="store_true",
                        help="also write NAME.int8.onnx (static post-training quantization) and compare accuracies")
    export.add_argument("--openvino", action="store_true",
                        help="also run the file in OpenVINO (its default precision, bf16 on CPUs that have it, and "
                             "f32) and compare outputs and accuracies with torch")
    export.add_argument("--tune", default=None, metavar="RUNTIME[:PRECISION]",
                        help="time each grouped block's forms in this runtime on this CPU and export the fastest: "
                             "onnxruntime, openvino, openvino:f32 or openvino:bf16 (recorded in the file's metadata)")
    export.add_argument("--tune-batch", type=positive_int, default=None,
                        help="with --tune: the batch size to tune for (default 1)")
    export.add_argument("--dataset", default=None, choices=DATASETS, metavar="NAME",
                        help="images to verify and calibrate on (default: the checkpoint's dataset, else synthetic)")
    export.add_argument("--data-dir", "--calibration-data", dest="data_dir", default=None,
                        help="where the dataset is (default: the checkpoint's)")
    export.add_argument("--calibration-images", type=positive_int, default=256, help="training images for int8")
    export.add_argument("--verify-images", type=int_at_least(MIN_VERIFY_IMAGES), default=128,
                        help=f"test images to verify on (at least {MIN_VERIFY_IMAGES})")
    export.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="largest accepted |ONNX - torch| of an output (times the largest |output| when > 1)")
    add_model_arguments(export, defaults=False)  # ARCH only; the defaults of gpconv train (ModelConfig's)
    export.add_argument("--num-classes", type=positive_int, default=argparse.SUPPRESS, help="ARCH only (default 10)")
    export.add_argument("--image-size", type=positive_int, default=None,
                        help="input size (default: the checkpoint's, else 224)")
    export.add_argument("--threads", type=positive_int, default=None, help="torch and ONNX Runtime CPU threads")
    export.set_defaults(run=run_export)


def _arch_config(args):
    """The ModelConfig of ``ARCH`` and the given options (ModelConfig's defaults for the others)."""
    from ..experiments.config import ModelConfig

    given = {name: getattr(args, name) for name in ARCH_OPTIONS if hasattr(args, name)}
    return ModelConfig(args.arch, image_size=args.image_size or 224, **given)


def _output_path(args) -> Path:
    """``--output``, else ``RUN/best.onnx`` beside the checkpoint, else ``ARCH-VARIANT.onnx`` here."""
    from ..experiments.cam import variant_label

    if args.output:
        return Path(args.output)
    if args.checkpoint:
        return Path(args.checkpoint).with_suffix(".onnx")
    return Path(f"{args.arch}-{variant_label(_arch_config(args))}.onnx")


def _model_and_data(args):
    """(eval model, ModelConfig, dataset splits, where the images come from) for ``args``."""
    from ..experiments.checkpoint import checkpoint_test_split, load_model_from_checkpoint
    from ..experiments.data import load_dataset
    from ..experiments.metrics import recalibrate_batch_norm

    if args.checkpoint:
        model, config, checkpoint = load_model_from_checkpoint(args.checkpoint)
        config.image_size = args.image_size or config.image_size
        # the run's own splits (dataset, data folder, seed, synthetic size): what gpconv evaluate measures
        dataset, splits = checkpoint_test_split(args.checkpoint, checkpoint, config, args.dataset, args.data_dir)
        seed = checkpoint["train_config"].get("seed", 0)
        source = f"the run's split, seed {seed}" if dataset == checkpoint["train_config"].get("dataset") else \
            f"split with the run's seed {seed}"
        return model.eval(), config, splits, source
    config = _arch_config(args)
    model = config.build()
    splits = load_dataset(args.dataset or "synthetic", args.data_dir, image_size=config.image_size,
                          synthetic_size=(max(args.calibration_images, 64), args.verify_images))
    if splits.num_classes != config.num_classes:
        raise ValueError(f"the model has {config.num_classes} classes, {splits.name} has {splits.num_classes}: "
                         "pass --num-classes")
    # untrained: give batch norm real statistics, so outputs (and the check) mean something
    recalibrate_batch_norm(model, splits.train, batches=4, batch_size=32, device="cpu")
    return model.eval(), config, splits, "seed 0"


def runtime_accuracy(predict, data, batch_size: int = 64) -> float:
    """Top-1 accuracy on an :class:`~gpconv.experiments.data.ImageSet` of ``predict`` (a float32 NCHW
    numpy batch -> its logits: an ONNX Runtime session or a compiled OpenVINO model, wrapped)."""
    from ..experiments.data import to_float

    correct = 0
    for start in range(0, len(data), batch_size):
        logits = predict(to_float(data.images[start:start + batch_size]).numpy())
        correct += int((logits.argmax(1) == data.labels[start:start + batch_size].numpy()).sum())
    return correct / max(len(data), 1)


def _onnx_runtime(path: Path, threads):
    from ..export import onnx_session

    session = onnx_session(path, threads)
    return lambda batch: session.run(None, {"images": batch})[0]


def _int8_path(fp32_path: Path) -> Path:
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


def _test_images(splits, source: str) -> str:
    return f"the {len(splits.test)} {splits.name} test images ({source})"


def _report_int8(args, torch_accuracy: float, fp32_path: Path, splits, source: str) -> None:
    from ..experiments.data import to_float
    from ..export import quantize_onnx

    int8_path = _int8_path(fp32_path)  # checked by run_export
    calibration = to_float(splits.train.images[:args.calibration_images])  # training images only, never test
    print(f"quantizing to int8 on {len(calibration)} training images, then evaluating on {len(splits.test)} test "
          "images ...", flush=True)
    quantize_onnx(fp32_path, int8_path, calibration, overwrite=args.overwrite)
    fp32 = runtime_accuracy(_onnx_runtime(fp32_path, args.threads), splits.test)
    int8 = runtime_accuracy(_onnx_runtime(int8_path, args.threads), splits.test)
    print(f"wrote {int8_path} (int8, calibrated on {len(calibration)} {splits.name} training images, {source})")
    print(f"test accuracy on {_test_images(splits, source)}: torch {torch_accuracy:.4f}  "
          f"ONNX Runtime fp32 {fp32:.4f}  int8 {int8:.4f} ({100 * (int8 - fp32):+.2f} points)")


def _report_openvino(args, model, torch_accuracy: float, path: Path, splits, images, source: str) -> None:
    """Print OpenVINO's largest difference from torch on ``images`` and its test accuracy, in OpenVINO's
    default precision for this CPU and in f32."""
    import torch

    from ..export import openvino_compile, openvino_default_precision

    default = openvino_default_precision()
    with torch.inference_mode():
        expected = model(images).numpy()
    parts = [f"torch {torch_accuracy:.4f}"]
    for precision in dict.fromkeys((default, "f32")):
        compiled = openvino_compile(path, threads=args.threads, precision=precision)
        predict = lambda batch, compiled=compiled: compiled(batch)[0]  # noqa: E731
        difference = float(abs(predict(images.numpy()) - expected).max())
        parts.append(f"OpenVINO {precision} {runtime_accuracy(predict, splits.test):.4f} "
                     f"(max |difference| {difference:.2g})")
    print(f"OpenVINO (default precision on this CPU: {default}): test accuracy on {_test_images(splits, source)}, "
          f"and the largest difference from torch on the {len(images)} verification images: " + "  ".join(parts))


def _check_arguments(args) -> None:
    """One-line ValueError for options that do not go together."""
    if (args.arch is None) == (args.checkpoint is None):
        raise ValueError("export needs exactly one of ARCH or --checkpoint")
    if args.tune_batch is not None and not args.tune:
        raise ValueError("--tune-batch is the batch --tune times the forms at: give --tune too")
    given = [name for name in ARCH_OPTIONS if hasattr(args, name)]
    if args.checkpoint and given:
        flag = "--no-l-layer" if given[0] == "l_layer" else "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag} describes an untrained ARCH; the model of --checkpoint comes from the checkpoint")


def run_export(args) -> None:
    """``gpconv export``."""
    import warnings

    import torch

    from ..experiments.data import to_float
    from ..export import check_output, export_onnx, parse_tune, require_deploy, tuning_summary

    _check_arguments(args)
    tuned_in = parse_tune(args.tune)[0] if args.tune else None
    needed = ("onnx", "onnxscript", "onnxruntime") + (("openvino",) if args.openvino or tuned_in == "openvino" else ())
    for module in needed:  # fail before any work when the extra is missing
        require_deploy(module)
    output = _output_path(args)
    if args.checkpoint and output.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--output {output} is the checkpoint itself: choose another path")
    check_output(output, args.overwrite)
    if args.int8:
        check_output(_int8_path(output), args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, config, splits, source = _model_and_data(args)
    images = to_float(splits.test.images[:args.verify_images])
    print(f"exporting {config.arch} to {output} and checking it on {len(images)} {splits.name} test images ...",
          flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_onnx's note is printed below
        batch = args.tune_batch or 1
        example = images[:2] if not args.tune else images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
        result = export_onnx(model, output, example, verify_input=images, tolerance=args.tolerance,
                             overwrite=args.overwrite, tune=args.tune, tune_threads=args.threads)
    print(f"wrote {result.path} ({config.arch}, {config.image_size}x{config.image_size} input, dynamic batch); "
          f"ONNX Runtime vs torch on {result.images} {splits.name} test images: max |difference| "
          f"{result.max_difference:.2g} (outputs up to {result.max_output:.3g})")
    if result.tuning:
        print(tuning_summary(result.tuning))
    if result.note:
        print(f"note: {result.note}")
    if args.int8 or args.openvino:
        from ..experiments.metrics import evaluate_model

        torch_accuracy = evaluate_model(model, splits.test, splits.num_classes).accuracy
    if args.int8:
        _report_int8(args, torch_accuracy, result.path, splits, source)
    if args.openvino:
        _report_openvino(args, model, torch_accuracy, result.path, splits, images, source)
