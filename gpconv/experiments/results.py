"""``gpconv report``: the paper-style table and plots of finished training runs.

Every figure in the table comes from the run folders: parameters and computations from
``metrics.json`` (``trainable_params``, ``computations``), test accuracy from ``tta.json`` (written by
``gpconv sweep``; without H-flip and with H-flip TTA) or, for a run trained by ``gpconv train``, from
``metrics.json`` (which holds one of the two, as its ``hflip_tta`` says).

Outputs (all written atomically): ``results.md``, ``results.csv``, ``accuracy_vs_parameters.png``,
``accuracy_vs_computations.png`` (one point per run, the Pareto front marked and labelled) and
``training_curves.png`` (validation accuracy and training loss of every run, overlaid).

With a latency table (``--latency FILE``: ``benchmarks/study_latency.py``'s CSV, one row per variant
with its time per batch in its fastest runtime at the study's input size, batch 64, and at 224x224,
batch 1) the runs' CSV gets ``latency_ms_b64``, ``latency_ms_b1``, ``runtime`` and ``runtime_b1``, and the report
adds ``accuracy_vs_latency.png`` and ``accuracy_vs_latency_b1.png`` (Pareto fronts) and a latency
column per setting. Measuring lives in ``benchmarks/``; the report only reads the table.

This module reads the run folders and writes the report; the tables and CSV files are made by
:mod:`gpconv.experiments.report_tables` and the plots by :mod:`gpconv.experiments.report_plots`
(whose names it re-exports, so ``gpconv.experiments.results.X`` keeps working).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from ..io import OutputError, atomic_write_text, claim_outputs, existing_outputs
from .plots import save_figure
from .report_plots import curves_plot, tradeoff_plot
from .report_tables import (HEADER, LATENCY_FIELDS, RUNS_CSV_FIELDS, VARIANT_HEADER, RunResult, VariantSummary,
                            attach_latencies, family_baselines, format_latency_table, format_results_table,
                            format_variant_table, pareto_front, read_latency_table, results_csv, runs_csv,
                            summarize_variants, table_rows)

__all__ = ["RunResult", "VariantSummary", "collect_runs", "load_run", "pareto_front", "format_results_table",
           "format_variant_table", "summarize_variants", "runs_csv", "write_report", "save_figure", "REPORT_FILES",
           "read_latency_table", "LATENCY_FIELDS", "HEADER", "RUNS_CSV_FIELDS", "VARIANT_HEADER", "family_baselines",
           "table_rows", "format_latency_table"]


def load_run(folder) -> RunResult:
    """Read one finished run folder (``metrics.json`` required; ``tta.json``, ``history.csv`` and
    ``config.json`` optional), each file's shape checked by its reader in
    :mod:`gpconv.experiments.run_folder` (one-line error naming the file and the field)."""
    from .run_folder import read_history, read_metrics, read_run_config, read_tta

    folder = Path(folder)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run (no metrics.json)")
    metrics = read_metrics(metrics_path)
    plain = tta = None
    if metrics.get("hflip_tta"):
        tta = metrics["test_accuracy"]
    else:
        plain = metrics["test_accuracy"]
    if (folder / "tta.json").is_file():
        extra = read_tta(folder / "tta.json")
        plain = extra.get("test_accuracy", plain)
        tta = extra.get("test_accuracy_hflip_tta", tta)
    history = read_history(folder / "history.csv") if (folder / "history.csv").is_file() else []
    config = read_run_config(folder / "config.json", require=()) if (folder / "config.json").is_file() else {}
    seed = config.get("train", {}).get("seed")
    return RunResult(folder.name, folder, metrics["trainable_params"], metrics["computations"], plain, tta,
                     metrics.get("epochs", len(history)), metrics.get("dataset", ""), history, seed,
                     # the epochs' own times: also right for a run resumed after an interruption
                     round(sum(row["seconds"] for row in history), 2) if history else metrics.get("train_seconds"),
                     float(config.get("model", {}).get("width", 1.0)))


def collect_runs(paths: Sequence) -> List[RunResult]:
    """Run folders named in ``paths``; a folder without ``metrics.json`` is taken as a sweep folder and
    its finished run folders are used (in ``sweep.json`` order when present, else by name)."""
    from .sweep import read_sweep_plan

    runs: List[RunResult] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder")
        if (path / "metrics.json").is_file():
            runs.append(load_run(path))
            continue
        order = []
        if (path / "sweep.json").is_file():
            order = [run["name"] for run in read_sweep_plan(path / "sweep.json")]
        children = [child for child in sorted(path.iterdir()) if (child / "metrics.json").is_file()]
        children.sort(key=lambda child: order.index(child.name) if child.name in order else len(order))
        if not children:
            raise ValueError(f"{path} holds no finished run (no metrics.json in it or in its subfolders)")
        runs.extend(load_run(child) for child in children)
    if not runs:
        raise ValueError("no runs to report")
    return runs


REPORT_FILES = ("results.csv", "runs.csv", "results.md", "accuracy_vs_parameters.png", "accuracy_vs_computations.png",
                "training_curves.png", "accuracy_vs_latency.png", "accuracy_vs_latency_b1.png")
# the accuracy-against-cost plots of a report: (RunResult / VariantSummary attribute, axis label, file)
COST_PLOTS = (("trainable_params", "trainable parameters", "accuracy_vs_parameters.png"),
              ("computations", "computations", "accuracy_vs_computations.png"))
LATENCY_PLOTS = (("latency_ms_b64", "ms per batch of 64, fastest runtime", "accuracy_vs_latency.png"),
                 ("latency_ms_b1", "ms per 224x224 image (batch 1), fastest runtime", "accuracy_vs_latency_b1.png"))


def write_report(paths: Sequence, output, *, baseline: Optional[str] = None, title: Optional[str] = None,
                 runs_csv_path=None, overwrite: bool = False, latency=None) -> List[Path]:
    """Write the table (``results.md``, ``results.csv``), ``runs.csv`` (or ``runs_csv_path``) and the
    plots of the runs in ``paths`` to ``output`` (:data:`REPORT_FILES`). Runs of one variant with several
    seeds are also summarised as mean ± standard deviation, and the plots show those means. Refused (one
    line) when ``output`` is a run folder, or holds one of those files and ``overwrite`` is false.
    ``latency``: a latency table (:func:`read_latency_table`) for the latency columns and plots."""
    from .run_folder import RUN_FILES

    runs = collect_runs(paths)
    if latency is not None:
        attach_latencies(runs, latency)
    output = Path(output)
    if existing_outputs(output, [name for name in RUN_FILES if name not in REPORT_FILES]):
        raise OutputError(f"{output} is a run folder (its training_curves.png is the run's own): choose another "
                          "--output for the report")
    claim_outputs(output, REPORT_FILES, overwrite=overwrite)
    runs_csv_path = Path(runs_csv_path) if runs_csv_path else output / "runs.csv"
    claim_outputs(runs_csv_path.parent, [runs_csv_path.name], overwrite=overwrite, option="--runs-csv")
    title = title or f"{len(runs)} run(s): " + ", ".join(sorted({r.dataset for r in runs if r.dataset}) or ["?"])
    written = [atomic_write_text(output / "results.csv", results_csv(runs, baseline)),
               atomic_write_text(runs_csv_path, runs_csv(runs))]
    summaries = summarize_variants(runs)
    written.append(atomic_write_text(output / "results.md", _markdown(runs, summaries, title, baseline, latency)))
    costs = COST_PLOTS + (LATENCY_PLOTS if latency is not None else ())
    plots = [tradeoff_plot(summaries, attribute, label, output / name, title) for attribute, label, name in costs]
    curves = curves_plot(runs, output / "training_curves.png", title)
    return written + plots[:len(COST_PLOTS)] + [curves] + plots[len(COST_PLOTS):]


def _markdown(runs: Sequence[RunResult], summaries: Sequence[VariantSummary], title: str, baseline: Optional[str],
              latency) -> str:
    """``results.md``: the by-variant table (when a variant has several seeds), the table of every run,
    the plots, and the latency section when ``latency`` (the latency table's path) is given."""
    by_variant = ""
    if any(len(summary.runs) > 1 for summary in summaries):
        by_variant = ("## By variant (mean ± sample standard deviation over seeds)\n\n"
                      f"{format_variant_table(summaries)}\n\n## Every run\n\n")
    markdown = (f"# {title}\n\n{by_variant}{format_results_table(runs, baseline)}\n\n"
                "Parameters and computations: `metrics.json` of each run (computations as the papers count them); "
                "% columns: of the baseline row. Test accuracy: best epoch's weights; H-flip TTA: mean of the "
                "softmaxes of the image and its horizontal flip.\n\n"
                "![accuracy vs parameters](accuracy_vs_parameters.png)\n"
                "![accuracy vs computations](accuracy_vs_computations.png)\n"
                "![training curves](training_curves.png)\n")
    if latency is not None:
        markdown += ("\n## Accuracy against latency\n\n" + format_latency_table(summaries) + "\n\n"
                     f"Milliseconds per batch in each variant's fastest runtime, from {Path(latency).name} "
                     "(benchmarks/study_latency.py): at the study's input size, batch 64, and at 224x224, batch 1.\n\n"
                     "![accuracy vs latency, batch 64](accuracy_vs_latency.png)\n"
                     "![accuracy vs latency, 224x224 batch 1](accuracy_vs_latency_b1.png)\n")
    return markdown
