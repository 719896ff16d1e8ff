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
"""

from __future__ import annotations

import csv
import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..io import OutputError, atomic_write, atomic_write_text, claim_outputs, existing_outputs, render_table

__all__ = ["RunResult", "VariantSummary", "collect_runs", "load_run", "pareto_front", "format_results_table",
           "format_variant_table", "summarize_variants", "runs_csv", "write_report", "save_figure", "REPORT_FILES",
           "read_latency_table", "LATENCY_FIELDS"]


@dataclass
class RunResult:
    """What the report needs from one run folder."""

    name: str
    folder: Path
    trainable_params: int
    computations: int
    test_accuracy: Optional[float]
    test_accuracy_hflip_tta: Optional[float]
    epochs: int
    dataset: str
    history: List[Dict[str, float]] = field(default_factory=list)
    seed: Optional[int] = None
    train_seconds: Optional[float] = None
    width: float = 1.0  # the model's width multiplier (config.json; 1 for runs from before widths)
    # from a latency table (read_latency_table): ms per batch in the fastest runtime, and that runtime
    latency_ms_b64: Optional[float] = None
    latency_ms_b1: Optional[float] = None
    runtime: Optional[str] = None
    runtime_b1: Optional[str] = None

    @property
    def variant(self) -> str:
        """The run name without the ``-seedN`` suffix ``gpconv sweep`` adds for multi-seed sweeps."""
        suffix = f"-seed{self.seed}"
        return self.name[:-len(suffix)] if self.seed is not None and self.name.endswith(suffix) else self.name

    @property
    def accuracy(self) -> Optional[float]:
        """Test accuracy without TTA when known, else with it (what the plots and the mean use)."""
        return self.test_accuracy if self.test_accuracy is not None else self.test_accuracy_hflip_tta


@dataclass
class VariantSummary:
    """The runs of one variant (its seeds) and their mean and standard deviation."""

    variant: str
    runs: List[RunResult]

    @property
    def trainable_params(self) -> int:
        return self.runs[0].trainable_params

    @property
    def computations(self) -> int:
        return self.runs[0].computations

    @property
    def latency_ms_b64(self) -> Optional[float]:
        return self.runs[0].latency_ms_b64

    @property
    def latency_ms_b1(self) -> Optional[float]:
        return self.runs[0].latency_ms_b1

    def mean_std(self, attribute: str):
        """(mean, sample standard deviation; 0 for one run) of ``attribute`` over the runs that have it,
        or None when none has it."""
        values = [getattr(run, attribute) for run in self.runs if getattr(run, attribute) is not None]
        if not values:
            return None
        mean = sum(values) / len(values)
        spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        return mean, spread


def summarize_variants(runs: Sequence[RunResult]) -> List[VariantSummary]:
    """Group ``runs`` by :attr:`RunResult.variant`, in the order the variants first appear."""
    groups: Dict[str, List[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return [VariantSummary(name, members) for name, members in groups.items()]


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


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> List[int]:
    """Indices of the runs no other run beats (lower or equal cost and higher or equal accuracy, one
    of them strictly), sorted by cost."""
    front = []
    for i, (cost, accuracy) in enumerate(zip(costs, accuracies)):
        dominated = any(c <= cost and a >= accuracy and (c < cost or a > accuracy)
                        for j, (c, a) in enumerate(zip(costs, accuracies)) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (costs[i], -accuracies[i]))


HEADER = ("model", "parameters", "% parameters", "computations", "% computations", "test accuracy",
          "test accuracy (H-flip TTA)", "epochs")


def _percent(value: float) -> str:
    return f"{value:.4f}" if value is not None else "-"


def family_baselines(variants: Sequence[str]) -> List[int]:
    """For each variant name, the index of its baseline: the variant ``PREFIXbaseline`` with the longest
    ``PREFIX`` that starts the name (``mobilenet_v3_large-v2-16ch`` -> ``mobilenet_v3_large-baseline``
    in a sweep of several architectures; ``baseline-w0.37`` -> ``baseline``), else the first baseline,
    else the first variant."""
    bases = [i for i, name in enumerate(variants) if name.endswith("baseline")]
    picks = []
    for name in variants:
        matching = [i for i in bases if name.startswith(variants[i][:-len("baseline")])]
        picks.append(max(matching, key=lambda i: len(variants[i]), default=bases[0] if bases else 0))
    return picks


def table_rows(runs: Sequence[RunResult], baseline: Optional[str] = None) -> List[List[str]]:
    """One row of strings per run (see :data:`HEADER`); the % columns divide by the run ``baseline``
    or, without it, by each run's family baseline (:func:`family_baselines`, first seed)."""
    names = [run.name for run in runs]
    if baseline is not None and baseline not in names:
        raise ValueError(f"no run named {baseline!r} to use as the baseline; runs: {', '.join(names)}")
    variants = [run.variant for run in runs]
    bases = [names.index(baseline)] * len(runs) if baseline else family_baselines(variants)
    return [[run.name, str(run.trainable_params), f"{100.0 * run.trainable_params / runs[b].trainable_params:.1f}",
             str(run.computations), f"{100.0 * run.computations / runs[b].computations:.1f}",
             _percent(run.test_accuracy), _percent(run.test_accuracy_hflip_tta), str(run.epochs)]
            for run, b in zip(runs, bases)]


def format_results_table(runs: Sequence[RunResult], baseline: Optional[str] = None) -> str:
    """The Markdown table (thousands separators in the count columns)."""
    rows = []
    for name, params, params_percent, computations, computations_percent, *rest in table_rows(runs, baseline):
        rows.append([name, f"{int(params):,}", params_percent + "%", f"{int(computations):,}",
                     computations_percent + "%", *rest])  # rest: accuracies and epochs as they are
    return render_table(HEADER, rows, markdown=True)


RUNS_CSV_FIELDS = ("variant", "seed", "width", "trainable_params", "computations", "test_accuracy",
                   "test_accuracy_hflip", "epochs", "train_seconds", "latency_ms_b64", "latency_ms_b1", "runtime",
                   "runtime_b1")


def runs_csv(runs: Sequence[RunResult]) -> str:
    """One row per run (:data:`RUNS_CSV_FIELDS`; empty where a run lacks the figure, the latencies
    without a latency table). ``runtime``: the fastest runtime at batch 64, ``runtime_b1`` at 224x224
    batch 1."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RUNS_CSV_FIELDS)
    for run in runs:
        values = (run.variant, run.seed, f"{run.width:g}", run.trainable_params, run.computations, run.test_accuracy,
                  run.test_accuracy_hflip_tta, run.epochs, run.train_seconds, run.latency_ms_b64, run.latency_ms_b1,
                  run.runtime, run.runtime_b1)
        writer.writerow(["" if value is None else value for value in values])
    return buffer.getvalue()


# the columns of a latency table (benchmarks/study_latency.py writes it; gpconv report --latency reads it)
LATENCY_FIELDS = ("variant", "runtime", "latency_ms_b64", "runtime_b1", "latency_ms_b1")


def read_latency_table(path) -> Dict[str, dict]:
    """``{variant: {"runtime", "latency_ms_b64", "runtime_b1", "latency_ms_b1"}}`` of a latency CSV
    (:data:`LATENCY_FIELDS`; milliseconds per batch); ValueError (one line naming the file and the line)
    on a missing column or a latency that is not a number > 0."""
    import math

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latency table {path} does not exist")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in LATENCY_FIELDS if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r} (expected: {', '.join(LATENCY_FIELDS)}); "
                             "write it with benchmarks/study_latency.py")
        table = {}
        for line, row in enumerate(reader, 2):
            entry = {"runtime": row["runtime"], "runtime_b1": row["runtime_b1"]}
            for key in ("latency_ms_b64", "latency_ms_b1"):
                try:
                    entry[key] = float(row[key])
                except (TypeError, ValueError):
                    entry[key] = float("nan")
                if not (math.isfinite(entry[key]) and entry[key] > 0):
                    raise ValueError(f"{path} line {line}: {key} is {row[key]!r}, expected milliseconds > 0")
            table[row["variant"]] = entry
    return table


def _attach_latencies(runs: Sequence[RunResult], path) -> None:
    """Set each run's latency fields from the latency table ``path``; ValueError (one line) when it has
    no row for a run's variant."""
    table = read_latency_table(path)
    for run in runs:
        if run.variant not in table:
            raise ValueError(f"{path} has no row for variant {run.variant!r}: measure the same runs with "
                             "benchmarks/study_latency.py")
        for key, value in table[run.variant].items():
            setattr(run, key, value)


def _mean_std(pair) -> str:
    return "-" if pair is None else f"{pair[0]:.4f} ± {pair[1]:.4f}"


VARIANT_HEADER = ("variant", "seeds", "parameters", "% parameters", "computations", "% computations",
                  "test accuracy (mean ± std)", "H-flip TTA (mean ± std)", "train minutes (mean)")


def format_latency_table(summaries: Sequence[VariantSummary]) -> str:
    """Markdown table: each variant's width, parameters, mean test accuracy and time per batch in its
    fastest runtime at batch 64 (the study's input size) and at 224x224 batch 1."""
    rows = []
    for summary in summaries:
        run = summary.runs[0]
        rows.append((summary.variant, f"{run.width:g}", f"{summary.trainable_params:,}",
                     _mean_std(summary.mean_std("accuracy")), f"{run.latency_ms_b64:.2f}", run.runtime,
                     f"{run.latency_ms_b1:.2f}", run.runtime_b1))
    header = ("variant", "width", "parameters", "test accuracy (mean ± std)", "ms per batch of 64",
              "fastest runtime (batch 64)", "ms at 224x224 batch 1", "fastest runtime (224 batch 1)")
    return render_table(header, rows, markdown=True)


def format_variant_table(summaries: Sequence[VariantSummary]) -> str:
    """Markdown table of the variants (:data:`VARIANT_HEADER`): mean ± sample standard deviation over
    their seeds."""
    bases = family_baselines([summary.variant for summary in summaries])
    rows = []
    for summary, index in zip(summaries, bases):
        base = summaries[index]
        seconds = summary.mean_std("train_seconds")
        rows.append((summary.variant, str(len(summary.runs)), f"{summary.trainable_params:,}",
                     f"{100.0 * summary.trainable_params / base.trainable_params:.1f}%", f"{summary.computations:,}",
                     f"{100.0 * summary.computations / base.computations:.1f}%",
                     _mean_std(summary.mean_std("accuracy")), _mean_std(summary.mean_std("test_accuracy_hflip_tta")),
                     "-" if seconds is None else f"{seconds[0] / 60:.1f}"))
    return render_table(VARIANT_HEADER, rows, markdown=True)


def save_figure(figure, path) -> Path:
    """Save a matplotlib figure as PNG atomically (:func:`gpconv.io.atomic_write`)."""
    return atomic_write(path, lambda out: figure.savefig(out, format="png", dpi=100))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _tradeoff_plot(summaries: Sequence[VariantSummary], attribute: str, label: str, path: Path, title: str) -> Path:
    """Mean test accuracy of each variant against ``attribute`` (error bars: the seeds' standard
    deviation), with the Pareto front of the means."""
    plt = _pyplot()
    costs = [getattr(summary, attribute) for summary in summaries]
    means = [summary.mean_std("accuracy") or (float("nan"), 0.0) for summary in summaries]
    accuracies = [mean for mean, _ in means]
    front = pareto_front(costs, accuracies)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    others = [i for i in range(len(summaries)) if i not in front]
    axis.errorbar([costs[i] for i in others], [accuracies[i] for i in others], [means[i][1] for i in others],
                  fmt="o", color="tab:gray", capsize=3, label="variant (mean ± std over seeds)")
    axis.errorbar([costs[i] for i in front], [accuracies[i] for i in front], [means[i][1] for i in front],
                  fmt="none", ecolor="tab:red", capsize=3)
    axis.plot([costs[i] for i in front], [accuracies[i] for i in front], color="tab:red", marker="o",
              drawstyle="steps-post", label="Pareto front (no variant is cheaper and more accurate)")
    by_cost = sorted(range(len(summaries)), key=lambda i: costs[i])
    offsets = {i: (4, 4) if rank % 2 == 0 else (4, -11) for rank, i in enumerate(by_cost)}  # neighbours alternate
    for i, summary in enumerate(summaries):
        axis.annotate(summary.variant, (costs[i], accuracies[i]), textcoords="offset points", xytext=offsets[i],
                      fontsize=8, color="tab:red" if i in front else "black",
                      fontweight="bold" if i in front else "normal")
    finite = [cost for cost in costs if cost and cost > 0]
    if finite and max(finite) > 10 * min(finite):  # a log axis only where the costs span a decade
        axis.set_xscale("log")
        label += " (log scale)"
    axis.set_xlabel(label)
    axis.set_ylabel("test accuracy")
    axis.set_title(textwrap.fill(title, 80), fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)


def _curves_plot(runs: Sequence[RunResult], path: Path, title: str) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = (("train_accuracy", "training accuracy"), ("val_accuracy", "validation accuracy"),
              ("train_loss", "training loss"))
    for run in runs:
        if not run.history:
            continue
        epochs = [row["epoch"] for row in run.history]
        color = None
        for axis, (key, _) in zip(axes, panels):
            line, = axis.plot(epochs, [row[key] for row in run.history], marker="o", color=color, label=run.name)
            color = line.get_color()
    for axis, (_, label) in zip(axes, panels):
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    figure.suptitle(textwrap.fill(title, 120), fontsize=10)
    figure.tight_layout()
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)


REPORT_FILES = ("results.csv", "runs.csv", "results.md", "accuracy_vs_parameters.png", "accuracy_vs_computations.png",
                "training_curves.png", "accuracy_vs_latency.png", "accuracy_vs_latency_b1.png")


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
        _attach_latencies(runs, latency)
    output = Path(output)
    if existing_outputs(output, [name for name in RUN_FILES if name not in REPORT_FILES]):
        raise OutputError(f"{output} is a run folder (its training_curves.png is the run's own): choose another "
                          "--output for the report")
    claim_outputs(output, REPORT_FILES, overwrite=overwrite)
    runs_csv_path = Path(runs_csv_path) if runs_csv_path else output / "runs.csv"
    claim_outputs(runs_csv_path.parent, [runs_csv_path.name], overwrite=overwrite, option="--runs-csv")
    title = title or f"{len(runs)} run(s): " + ", ".join(sorted({r.dataset for r in runs if r.dataset}) or ["?"])
    rows = table_rows(runs, baseline)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    written = [atomic_write_text(output / "results.csv", buffer.getvalue()),
               atomic_write_text(runs_csv_path, runs_csv(runs))]
    summaries = summarize_variants(runs)
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
    written.append(atomic_write_text(output / "results.md", markdown))
    written.append(_tradeoff_plot(summaries, "trainable_params", "trainable parameters",
                                  output / "accuracy_vs_parameters.png", title))
    written.append(_tradeoff_plot(summaries, "computations", "computations", output / "accuracy_vs_computations.png",
                                  title))
    written.append(_curves_plot(runs, output / "training_curves.png", title))
    if latency is not None:
        written.append(_tradeoff_plot(summaries, "latency_ms_b64", "ms per batch of 64, fastest runtime",
                                      output / "accuracy_vs_latency.png", title))
        written.append(_tradeoff_plot(summaries, "latency_ms_b1", "ms per 224x224 image (batch 1), fastest runtime",
                                      output / "accuracy_vs_latency_b1.png", title))
    return written
