"""The ``shrink`` subcommand of ``gpconv``: a trained dense run folder -> its grouped version, fitted and
distilled (:mod:`gpconv.experiments.shrink`; registered by :func:`add_shrink_command`)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..core.plan import PLAN_VERSIONS
from ..experiments.config import non_negative_int, positive_float, positive_int

__all__ = ["add_shrink_command", "run_shrink"]


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the parameters in (0, 1], got {text!r}")
    return value


def add_shrink_command(commands) -> None:
    """Add ``shrink`` to the ``gpconv`` subparsers ``commands``; its defaults are ``ShrinkConfig``'s."""
    from ..experiments.config import OPTIMIZERS, SHRINK_INITS, ShrinkConfig

    default = {item.name: item.default for item in fields(ShrinkConfig)}
    shrink = commands.add_parser("shrink", help="shrink a trained dense model: convert, fit to the dense layers, "
                                                "distil (see docs/convert.md)")
    shrink.add_argument("--checkpoint", required=True, help="best.pt of a dense gpconv run (the teacher)")
    size = shrink.add_mutually_exclusive_group(required=True)
    size.add_argument("--channels-per-group", type=positive_int, help="the same channels per group everywhere")
    size.add_argument("--budget", type=_fraction,
                      help="trainable parameters as a fraction of the teacher's; each layer's channels per group chosen")
    shrink.add_argument("--version", type=int, default=default["version"], choices=PLAN_VERSIONS)
    shrink.add_argument("--no-l-layer", dest="l_layer", action="store_false")
    shrink.add_argument("--init", default=default["init"], choices=SHRINK_INITS,
                        help="fit: blocks fitted to the dense layers (default); random: plain convert (a control)")
    shrink.add_argument("--epochs", type=non_negative_int, default=default["epochs"],
                        help="fine-tuning epochs with the teacher (0: evaluate the fitted model)")
    shrink.add_argument("--lr", type=positive_float, default=None,
                        help="start of the cosine schedule (default: 3e-3 with --channels-per-group, 1e-3 with "
                             "--budget: the best on validation after 6 epochs, docs/results.md)")
    shrink.add_argument("--optimizer", default=default["optimizer"], choices=OPTIMIZERS,
                        help="adamw (default: measured better for a short fine-tune) or the papers' rmsprop")
    shrink.add_argument("--augment", action="store_true",
                        help="the papers' Keras augmentation while fine-tuning (off by default: measured worse over 6 "
                             "epochs, docs/results.md)")
    shrink.add_argument("--temperature", type=positive_float, default=default["temperature"])
    shrink.add_argument("--distillation-weight", type=float, default=default["distillation_weight"],
                        help="weight of the teacher's soft targets; the labels get the rest")
    shrink.add_argument("--calibration-images", type=positive_int, default=default["calibration_images"],
                        help="training images the fit sees")
    shrink.add_argument("--fit-steps", type=non_negative_int, default=default["fit_steps"],
                        help="L-BFGS iterations refining each block after its closed-form start")
    shrink.add_argument("--block-steps", type=non_negative_int, default=default["block_steps"],
                        help="Adam steps training each block (an MBConv) towards the dense model's block output after "
                             "the per-layer fit (block reconstruction, docs/convert.md; --init fit only); 0: none")
    shrink.add_argument("--seed", type=int, default=default["seed"])
    shrink.add_argument("--start-from", metavar="RUN",
                        help="an earlier shrink's run folder (same teacher and settings, e.g. --epochs 0) whose "
                             "fitted model to fine-tune, instead of converting and fitting again")
    shrink.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    shrink.add_argument("--output", required=True, help="the new run folder")
    shrink.add_argument("--resume", action="store_true", help="continue a stopped shrink in --output")
    shrink.add_argument("--overwrite", action="store_true", help="replace the run files in --output")
    shrink.set_defaults(run=run_shrink)


def run_shrink(args) -> None:
    import torch

    from ..experiments.config import ShrinkConfig
    from ..experiments.shrink import shrink

    if args.threads:
        torch.set_num_threads(args.threads)
    names = {item.name for item in fields(ShrinkConfig)}
    config = ShrinkConfig(**{name: value for name, value in vars(args).items() if name in names})
    metrics = shrink(config, resume=args.resume, overwrite=args.overwrite)
    print(f"{config.output}: test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_images']} test images, "
          f"{metrics['trainable_params']:,} trainable parameters")
