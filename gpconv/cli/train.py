"""The ``train`` and ``evaluate`` subcommands of ``gpconv`` (registered by :func:`add_training_commands`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..core.plan import PLAN_VERSIONS
from ..experiments import DATASETS
from ..experiments.config import non_negative_int, positive_float, positive_int
from ..models import CLASSIFIER_INITS, list_models

__all__ = ["add_training_commands", "add_model_arguments", "MODEL_OPTIONS", "run_train", "run_evaluate",
           "demo_training"]


def _pair(text: str):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 10:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST image counts (each >= 10), got {text!r}")
    return values


# the options of ModelConfig that describe an architecture's variant (train, export ARCH)
MODEL_OPTIONS = ("channels_per_group", "version", "l_layer", "activation", "skip_strides", "width")


def add_model_arguments(parser, *, defaults: bool = True) -> None:
    """Add the variant options of ``gpconv train`` (:data:`MODEL_OPTIONS`) to ``parser``. Their defaults
    are :class:`~gpconv.experiments.config.ModelConfig`'s, the one source of them (``activation`` None:
    the family's own); ``defaults=False`` leaves an option out of the parsed arguments unless given
    (``gpconv export`` refuses them with ``--checkpoint``)."""
    from dataclasses import fields

    from ..experiments.config import ModelConfig

    default = {item.name: item.default for item in fields(ModelConfig)} if defaults else {}
    given = lambda name: default.get(name, argparse.SUPPRESS)  # noqa: E731
    parser.add_argument("--channels-per-group", type=positive_int, default=given("channels_per_group"),
                        help="k-variant with this many channels per group (default: the dense baseline)")
    parser.add_argument("--version", type=int, default=given("version"), choices=PLAN_VERSIONS)
    parser.add_argument("--no-l-layer", dest="l_layer", action="store_false", default=given("l_layer"))
    parser.add_argument("--activation", default=given("activation"),
                        help="default: the family's own (swish for EfficientNet, the reference's choice for the others)")
    parser.add_argument("--skip-strides", type=non_negative_int, default=given("skip_strides"),
                        help="3 is the papers' 32x32 setting")
    parser.add_argument("--width", type=positive_float, default=given("width"),
                        help="width multiplier (EfficientNet, MobileNet, MobileNet V3): every channel count times W, "
                             "rounded to a multiple of 8 (default 1: the papers' model)")


def add_training_commands(commands) -> None:
    """Add ``train`` and ``evaluate`` to the ``gpconv`` subparsers ``commands``."""
    train = commands.add_parser("train", help="train a model with the papers' protocol (see docs/training.md)")
    train.add_argument("--arch", required=True, choices=list_models(), metavar="ARCH",
                       help="one of: " + ", ".join(list_models()))
    add_model_arguments(train)
    train.add_argument("--dataset", required=True, choices=DATASETS, metavar="NAME",
                       help="one of: " + ", ".join(DATASETS))
    train.add_argument("--data-dir", default=None, help="where the dataset is (or is downloaded to: CIFAR and the papers' named datasets)")
    train.add_argument("--image-size", type=positive_int, default=32)
    train.add_argument("--epochs", type=positive_int, default=50)
    train.add_argument("--batch-size", type=positive_int, default=64)
    train.add_argument("--lr", type=positive_float, default=1e-3, help="base learning rate of the cyclical schedule")
    train.add_argument("--lr-cycle", type=positive_int, default=25, help="epochs per cycle of the schedule (25)")
    train.add_argument("--classifier-init", default="family", choices=CLASSIFIER_INITS,
                       help="family: the family's rule (Keras' for EfficientNet); torch: nn.Linear's default")
    train.add_argument("--max-train-batches", type=positive_int, default=None,
                       help="train on at most N batches per epoch (quick runs)")
    train.add_argument("--monitor", default="val_accuracy", choices=("val_accuracy", "val_loss"))
    train.add_argument("--hflip-tta", action="store_true", help="test with image + horizontally flipped image")
    train.add_argument("--val-flips", action="store_true",
                       help="validation x4 with horizontal/vertical flips (Entropy 2022)")
    train.add_argument("--no-augment", dest="augment", action="store_false")
    train.add_argument("--precise-bn-batches", type=non_negative_int, default=0,
                       help="recompute batch-norm statistics over N batches after each epoch (not in the protocol)")
    train.add_argument("--synthetic-size", type=_pair, default=[2000, 500], metavar="TRAIN,TEST",
                       help="image counts of the synthetic dataset (default 2000,500)")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from last.pt")
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--output", required=True, help="run folder")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run files of a run already in --output (other files are kept)")
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on a test split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--dataset", default=None, choices=DATASETS, metavar="NAME",
                          help="default: the dataset it was trained on")
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--hflip-tta", action="store_true")
    evaluate.add_argument("--batch-size", type=positive_int, default=64)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to FILE")
    evaluate.add_argument("--overwrite", action="store_true", help="replace FILE of --json when it exists")
    evaluate.set_defaults(run=run_evaluate)


def run_train(args, callbacks: Sequence = ()) -> None:
    """``gpconv train``; ``callbacks``: :class:`~gpconv.experiments.training.Callback` hooks (tests)."""
    import torch

    from ..experiments.config import ModelConfig, TrainConfig
    from ..experiments.training import TrainingDiverged, train

    if args.threads:
        torch.set_num_threads(args.threads)
    model_config = ModelConfig(args.arch, image_size=args.image_size, classifier_init=args.classifier_init,
                               **{name: getattr(args, name) for name in MODEL_OPTIONS})
    model_config.build()  # fail early, with create_model's one-line message, on a bad combination
    config = TrainConfig(dataset=args.dataset, output=args.output, data_dir=args.data_dir, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, lr_cycle=args.lr_cycle, max_train_batches=args.max_train_batches,
                         monitor=args.monitor, hflip_tta=args.hflip_tta, val_flips=args.val_flips,
                         augment=args.augment, seed=args.seed, device=args.device,
                         precise_bn_batches=args.precise_bn_batches, synthetic_size=args.synthetic_size)
    try:
        train(config, model_config, resume=args.resume, overwrite=args.overwrite, callbacks=callbacks,
              log=lambda line: print(line, flush=True))
    except TrainingDiverged as error:
        print(f"gpconv: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_evaluate(args) -> None:
    """``gpconv evaluate``."""
    from ..io import atomic_write_text, claim_outputs
    from ..experiments.metrics import evaluate_checkpoint, format_report

    if args.json:  # refused before the (long) evaluation
        claim_outputs(Path(args.json).parent, [Path(args.json).name], overwrite=args.overwrite, option="--json")
    metrics = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_dir, hflip_tta=args.hflip_tta,
                                  batch_size=args.batch_size, device=args.device)
    print(format_report(metrics["per_class"]))
    print(f"test accuracy {metrics['test_accuracy']:.4f}  test loss {metrics['test_loss']:.4f}  "
          f"({metrics['test_images']} images, {metrics['dataset']}, epoch {metrics['epoch']}"
          f"{', hflip TTA' if args.hflip_tta else ''})")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(metrics, indent=2))


def demo_training(output: str, epochs: int = 1, max_train_batches: int = 16, threads: int = 2,
                  overwrite: bool = False) -> dict:
    """The demo's short training: kEffNet-B0 V2 16ch (32x32, skip_strides=3) on the synthetic set.
    A run already in ``output`` is refused unless ``overwrite`` (its run files are replaced)."""
    import torch

    from ..experiments.config import ModelConfig, TrainConfig
    from ..experiments.training import train

    torch.set_num_threads(threads)
    model_config = ModelConfig("efficientnet_b0", channels_per_group=16, skip_strides=3, image_size=32)
    config = TrainConfig(dataset="synthetic", output=output, epochs=epochs, batch_size=32,
                         max_train_batches=max_train_batches, precise_bn_batches=4, seed=0)
    return train(config, model_config, overwrite=overwrite, log=lambda line: print(line, flush=True))
