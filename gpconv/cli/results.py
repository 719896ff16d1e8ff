"""The ``sweep``, ``report`` and ``cam`` subcommands of ``gpconv`` (registered by :func:`add_results_commands`)."""

from __future__ import annotations

import argparse

from ..experiments import DATASETS
from ..models import list_models
from ..experiments.config import non_negative_int, positive_int

__all__ = ["add_results_commands", "run_sweep_command", "run_report_command", "run_cam_command"]


def _int_list(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _name_list(text: str):
    return [v.strip() for v in text.split(",") if v.strip()]


def add_results_commands(commands) -> None:
    """Add ``sweep``, ``report`` and ``cam`` to the ``gpconv`` subparsers ``commands``."""
    sweep = commands.add_parser("sweep", help="train a set of variants, one run folder each (resumable)")
    sweep.add_argument("--config", default=None, help="YAML sweep config (configs/*.yaml); flags below override it")
    sweep.add_argument("--arch", default=None, choices=list_models(), metavar="ARCH",
                       help="one of: " + ", ".join(list_models()))
    sweep.add_argument("--variants", type=_name_list, default=None,
                       help="comma-separated: baseline, full names (v2-16ch-noL) or templates expanded over "
                            "--channels-per-group (v2, v2-noL, v2-relu, v1)")
    sweep.add_argument("--channels-per-group", type=_int_list, default=None, help="e.g. 2,4,8,16,32")
    sweep.add_argument("--dataset", default=None, choices=DATASETS, metavar="NAME", help="one of: " + ", ".join(DATASETS))
    sweep.add_argument("--data-dir", default=None)
    sweep.add_argument("--image-size", type=positive_int, default=None)
    sweep.add_argument("--skip-strides", type=non_negative_int, default=None, help="3 is the papers' 32x32 EfficientNet setting")
    sweep.add_argument("--epochs", type=positive_int, default=None)
    sweep.add_argument("--batch-size", type=positive_int, default=None)
    sweep.add_argument("--max-train-batches", type=positive_int, default=None)
    sweep.add_argument("--seed", type=non_negative_int, default=None)
    sweep.add_argument("--precise-bn-batches", type=positive_int, default=None,
                       help="recompute batch-norm statistics on N training batches before each evaluation "
                            "(short runs: Keras' momentum leaves them far from the data)")
    sweep.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    sweep.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    sweep.add_argument("--only", type=_name_list, default=None, help="run only these run names (comma-separated)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    sweep.add_argument("--output", required=True, help="sweep folder (one run folder per variant inside)")
    sweep.set_defaults(run=run_sweep_command)

    report = commands.add_parser("report", help="paper-style table and plots of finished runs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or sweep folders (their run folders are used)")
    report.add_argument("--output", required=True, help="folder for results.md, results.csv and the plots")
    report.add_argument("--baseline", default=None, help="run name of the 100%% row (default: 'baseline' if present, "
                                                          "else the first run)")
    report.add_argument("--title", default=None)
    report.add_argument("--runs-csv", default=None, metavar="FILE",
                        help="where the one-row-per-run CSV goes (default: OUTPUT/runs.csv)")
    report.add_argument("--latency", default=None, metavar="FILE",
                        help="latency table of the same variants (benchmarks/study_latency.py): adds the latency "
                             "columns to the runs' CSV and accuracy_vs_latency*.png")
    report.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier report")
    report.set_defaults(run=run_report_command)

    cam = commands.add_parser("cam", help="class activation maps of a trained model on test images")
    cam.add_argument("--checkpoint", required=True)
    cam.add_argument("--compare", default=None, metavar="CKPT2",
                     help="second checkpoint (e.g. a k-model): side by side with --checkpoint on the same images")
    cam.add_argument("--dataset", default=None, choices=DATASETS, metavar="NAME",
                     help="default: the dataset it was trained on")
    cam.add_argument("--data-dir", default=None)
    cam.add_argument("--images", type=positive_int, default=8, help="how many test images (the first N)")
    cam.add_argument("--class-index", type=int, default=None,
                     help="map of this class (default: each model's predicted class)")
    cam.add_argument("--output", required=True, help="folder for cam_NNN.png and cam_grid.png")
    cam.add_argument("--overwrite", action="store_true", help="replace cam_NNN.png and cam_grid.png of an earlier run")
    cam.set_defaults(run=run_cam_command)


def run_sweep_command(args) -> None:
    """``gpconv sweep``."""
    from ..experiments.sweep import expand_runs, load_sweep_config, run_sweep

    config = load_sweep_config(args.config) if args.config else {}
    if not args.config and (args.arch is None or args.variants is None or args.dataset is None):
        raise ValueError("give --config FILE, or --arch, --variants and --dataset")
    overrides = {"arch": args.arch, "variants": args.variants, "channels_per_group": args.channels_per_group,
                 "dataset": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size,
                 "skip_strides": args.skip_strides, "epochs": args.epochs, "batch_size": args.batch_size,
                 "max_train_batches": args.max_train_batches, "seed": args.seed,
                 "precise_bn_batches": args.precise_bn_batches}
    specs = expand_runs(config, overrides)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"--only: no run named {unknown[0]!r}; runs: {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in args.only]
    print(f"sweep of {len(specs)} run(s) in {args.output}: {', '.join(s.name for s in specs)}", flush=True)
    if args.dry_run:
        for spec in specs:
            print(f"  {spec.name}: {spec.arch} {spec.variant} {spec.options}")
        return
    summaries = run_sweep(specs, args.output, threads=args.threads, device=args.device,
                          log=lambda line: print(line, flush=True))
    print("run  status  test_accuracy  test_accuracy_hflip_tta")
    for row in summaries:
        print(f"{row['name']}  {row['status']}  {row.get('test_accuracy', float('nan')):.4f}  "
              f"{row.get('test_accuracy_hflip_tta', float('nan')):.4f}")


def run_report_command(args) -> None:
    """``gpconv report``."""
    from ..experiments.results import write_report

    written = write_report(args.runs, args.output, baseline=args.baseline, title=args.title,
                           runs_csv_path=args.runs_csv, overwrite=args.overwrite, latency=args.latency)
    for path in written:
        print(path)


def run_cam_command(args) -> None:
    """``gpconv cam``."""
    from ..experiments.cam import write_cams

    write_cams(args.checkpoint, args.output, dataset=args.dataset, data_dir=args.data_dir,
                         images=args.images, compare=args.compare, class_index=args.class_index, overwrite=args.overwrite,
                         log=lambda line: print(line, flush=True))
