"""The ``gpconv`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import List, Optional

import torch

from ..core.convert import summarize
from ..core.counting import count_computations, count_macs, count_parameters
from ..models import check_input_size, create_model, list_models
from ..core.plan import PLAN_VERSIONS, make_plan
from ..io import render_table
from ..experiments.paper_tables import format_table, paper_table
from .export import add_export_command
from .results import add_results_commands
from .shrink import add_shrink_command
from .train import add_model_arguments, add_training_commands, demo_training

DEMO_VARIANTS = ("baseline", "v1-16ch", "v1-32ch", "v2-2ch", "v2-4ch", "v2-8ch", "v2-16ch", "v2-32ch")

# pyproject.toml's extras, by the names their packages are imported as (pillow: PIL, pyyaml: yaml).
EXTRAS = {"train": ("numpy", "PIL", "tqdm", "matplotlib", "yaml"),
          "deploy": ("onnx", "onnxscript", "onnxruntime", "openvino"),
          "interop": ("transformers",)}
# Commands that read data, train, plot or load configs: the train extra (``demo`` too, unless --no-train).
# The others (table, plan, summary, demo --no-train) need torch alone.
TRAIN_COMMANDS = ("train", "evaluate", "sweep", "report", "cam", "export", "shrink")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other gpconv error
        self.exit(2, f"gpconv: error: {message}\n")


def _variants(text: str) -> List[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _widths(text: str) -> List[float]:
    from ..experiments.config import positive_float

    values = [positive_float(value.strip()) for value in text.split(",") if value.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def _table(args) -> None:
    started = time.perf_counter()
    rows = paper_table(args.arch, args.variants, args.num_classes, args.input_size, widths=getattr(args, "widths", [1.0]))
    print(f"{args.arch}, {args.num_classes} classes, {args.input_size}x{args.input_size} input "
          f"(counted in {time.perf_counter() - started:.1f} s)")
    print(format_table(rows, markdown=args.markdown))


def _plan(args) -> None:
    plan = make_plan(args.in_channels, args.out_channels, args.channels_per_group, version=args.version,
                     l_layer=args.l_layer)
    print(plan)


def _demo(args) -> None:
    if args.train:  # refuse a folder that holds a run before the table, not after it
        from pathlib import Path

        from ..experiments.run_folder import prepare_run_folder

        prepare_run_folder(Path(args.output), resume=False, overwrite=args.overwrite, main=False)
    print("kEffNet-B0 on 32x32 inputs (skip_strides=3), 10 classes: ours vs the authors' Keras figures\n")
    args.arch, args.num_classes, args.input_size, args.variants, args.markdown = (
        "efficientnet_b0", 10, 32, list(DEMO_VARIANTS), False)
    _table(args)
    print("\nThe papers' % column divides by the 224x224 baseline (389,969,098 computations); the one above "
          "divides by the baseline at the same 32x32 input.\n")
    print("Plan of one layer (Entropy 2022, Table 1: the 1152 -> 320 projection of EfficientNet-B0):")
    print(make_plan(1152, 320, 16))
    if args.train:
        print("\nShort training of kEffNet-B0 V2 16ch (32x32, skip_strides=3) on the built-in synthetic dataset "
              "(CPU, a few dozen batches; see docs/training.md):")
        metrics = demo_training(args.output, overwrite=args.overwrite)
        print(f"kEffNet-B0 V2 16ch on synthetic: test accuracy {metrics['test_accuracy']:.4f} "
              f"({metrics['test_images']} test images, 10 classes, chance 0.10); run folder {args.output}")


def _variant_label(args, channels_per_group, width) -> str:
    label = "baseline" if channels_per_group is None else \
        f"v{args.version}-{channels_per_group}ch" + ("" if args.l_layer else "-noL")
    return label + ("" if width == 1.0 else f" (width {width:g})")


def _measure(args, channels_per_group, width):
    """Build on the meta device (shapes only: fast) and count parameters, MACs and computations."""
    check_input_size(args.arch, args.input_size, args.skip_strides)
    with torch.device("meta"):
        model = create_model(args.arch, args.num_classes, channels_per_group=channels_per_group, version=args.version,
                             l_layer=args.l_layer, activation=args.activation, skip_strides=args.skip_strides,
                             **({} if width == 1.0 else {"width": width}))
    return model, (count_parameters(model), count_macs(model, args.input_size),
                   count_computations(model, args.input_size))


def _checkpoint_summary(path: str) -> None:
    """``gpconv summary --checkpoint RUN/best.pt``: the model of a run (a shrunk one shows each layer's channels
    per group and, from the run's fit.json, its fit error)."""
    import json
    from pathlib import Path

    from ..core.convert import FIT_ERROR_ATTRIBUTE
    from ..core.block import GroupedPointwiseLinear
    from ..experiments.checkpoint import load_model_from_checkpoint

    model, model_config, _ = load_model_from_checkpoint(path)
    fit_file = Path(path).parent / "fit.json"
    if fit_file.exists():
        errors = {layer["name"]: layer["relative_error"] for layer in json.loads(fit_file.read_text()).get("layers", [])}
        for name, module in model.named_modules():
            if name in errors:
                block = module.block if isinstance(module, GroupedPointwiseLinear) else module
                setattr(block, FIT_ERROR_ATTRIBUTE, errors[name])
    size = model_config.image_size
    print(f"{path}: {model_config.arch}, {model_config.num_classes} classes, {size}x{size} input")
    print(summarize(model))
    print(f"parameters {count_parameters(model):,}, MACs {count_macs(model, size):,}, computations "
          f"{count_computations(model, size):,}")


def _summary(args) -> None:
    if args.checkpoint is not None:
        return _checkpoint_summary(args.checkpoint)
    if args.arch is None:
        raise ValueError("give an ARCH or --checkpoint")
    if args.input_size is None:
        args.input_size = 32 if args.arch == "densenet_bc_100" else 224
    started = time.perf_counter()
    model, figures = _measure(args, args.channels_per_group, args.width)
    label = _variant_label(args, args.channels_per_group, args.width)
    rows = [(label, figures)]
    if args.compare and (args.channels_per_group is not None or args.width != 1.0):  # against the dense width-1 model
        rows.insert(0, ("baseline", _measure(args, None, 1.0)[1]))
    print(f"{args.arch} {label}, {args.num_classes} classes, {args.input_size}x{args.input_size} input")
    print(summarize(model))
    print()
    header = ("model", "parameters", "MACs", "computations")
    body = [(name,) + tuple(f"{value:,}" for value in values) for name, values in rows]
    if len(rows) == 2:
        base = rows[0][1]
        body[1] = (body[1][0],) + tuple(f"{value:,} ({100 * value / base[i]:.1f}%)" for i, value in enumerate(rows[1][1]))
    print(render_table(header, body, rule=False))
    print(f"(computations: the papers' TensorFlow-profiler count; counted in {time.perf_counter() - started:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpconv", description="Interleaved grouped pointwise convolutions (kEffNet).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="paper-style table for kEffNet-B0 and the plan of one layer")
    demo.add_argument("--no-train", dest="train", action="store_false", help="only the table, no short training")
    demo.add_argument("--output", default="runs/demo", help="run folder of the demo training")
    demo.add_argument("--overwrite", action="store_true", help="replace the run files of an earlier demo in --output")
    demo.set_defaults(run=_demo)

    table = commands.add_parser("table", help="parameters and computations of variants, next to the papers'")
    table.add_argument("--arch", default="efficientnet_b0", choices=list_models(), metavar="ARCH",
                       help="one of: " + ", ".join(list_models()))
    table.add_argument("--variants", type=_variants, default=list(DEMO_VARIANTS),
                       help="comma-separated, first is the 100%% row (e.g. baseline,v2-16ch,v2-16ch-noL)")
    table.add_argument("--num-classes", type=int, default=10)
    table.add_argument("--input-size", type=int, default=224)
    table.add_argument("--widths", type=_widths, default=[1.0],
                       help="comma-separated width multipliers: every variant at each (default 1; e.g. 1,0.5)")
    table.add_argument("--markdown", action="store_true", help="print a Markdown table")
    table.set_defaults(run=_table)

    plan = commands.add_parser("plan", help="print the grouping plan of one pointwise convolution")
    plan.add_argument("in_channels", type=int)
    plan.add_argument("out_channels", type=int)
    plan.add_argument("--channels-per-group", type=int, required=True)
    plan.add_argument("--version", type=int, default=2, choices=PLAN_VERSIONS)
    plan.add_argument("--no-l-layer", dest="l_layer", action="store_false")
    plan.set_defaults(run=_plan)

    summary = commands.add_parser("summary", help="per-layer table of the grouped pointwise convolutions and totals")
    summary.add_argument("arch", nargs="?", choices=list_models(), metavar="ARCH",
                         help="one of: " + ", ".join(list_models()))
    summary.add_argument("--checkpoint", default=None,
                         help="summarise a run's model instead (a shrunk one: each layer's channels per group and fit error)")
    add_model_arguments(summary)  # the variant options of gpconv train, ModelConfig's defaults
    summary.add_argument("--num-classes", type=int, default=10)
    summary.add_argument("--input-size", type=int, default=None, help="default: 32 for densenet_bc_100, else 224")
    summary.add_argument("--compare", action="store_true", help="also count the dense baseline (width 1)")
    summary.set_defaults(run=_summary)

    add_training_commands(commands)  # train, evaluate (gpconv/cli/train.py)
    add_results_commands(commands)  # sweep, report, cam (gpconv/cli/results.py)
    add_export_command(commands)  # export (gpconv/cli/export.py)
    add_shrink_command(commands)  # shrink (gpconv/cli/shrink.py)
    return parser


def missing_extra_message(command: str, module: Optional[str]) -> Optional[str]:
    """The one-line error of ``gpconv command`` when the missing ``module`` belongs to an extra, else None."""
    top = (module or "").split(".")[0]
    extra = next((name for name, modules in EXTRAS.items() if top in modules), None)
    if extra is None:
        return None
    return f"gpconv {command} needs {top}, which is not installed: pip install 'gpconv[{extra}]'"


def _check_train_extra(args) -> None:
    """ModuleNotFoundError, before any work, when ``args.command`` needs the train extra and one of its
    packages is missing."""
    if args.command not in TRAIN_COMMANDS and not (args.command == "demo" and args.train):
        return
    for module in EXTRAS["train"]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_train_extra(args)
        args.run(args)
    except ModuleNotFoundError as error:  # an extra's package (checked above, or imported on the way): one line
        message = missing_extra_message(args.command, error.name)
        if message is None:
            raise
        print(f"gpconv: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as error:
        print(f"gpconv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpconv: interrupted", file=sys.stderr)
        return 130
    return 0

