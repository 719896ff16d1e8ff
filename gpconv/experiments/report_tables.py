"""The report's figures as data and text: one :class:`RunResult` per run folder, the variants' means
(:class:`VariantSummary`), the Pareto front, the Markdown tables, the CSV files and the latency table.

Percent columns divide by each run's family baseline (:func:`family_baselines`); means are over a
variant's seeds with the sample standard deviation. No file is read here except the latency CSV
(:func:`read_latency_table`); :mod:`gpconv.experiments.results` reads the run folders.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..io import render_table

__all__ = ["RunResult", "VariantSummary", "summarize_variants", "pareto_front", "HEADER", "family_baselines",
           "table_rows", "format_results_table", "results_csv", "RUNS_CSV_FIELDS", "runs_csv", "LATENCY_FIELDS",
           "read_latency_table", "attach_latencies", "VARIANT_HEADER", "format_latency_table", "format_variant_table"]


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


def results_csv(runs: Sequence[RunResult], baseline: Optional[str] = None) -> str:
    """``results.csv``: :data:`HEADER` and the rows of :func:`table_rows` (counts without separators)."""
    return _csv_text(HEADER, table_rows(runs, baseline))


def _csv_text(header: Sequence[str], rows) -> str:
    """CSV text (``\\n`` line ends) of ``header`` and ``rows``; None values as empty fields."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if value is None else value for value in row] for row in rows)
    return buffer.getvalue()


RUNS_CSV_FIELDS = ("variant", "seed", "width", "trainable_params", "computations", "test_accuracy",
                   "test_accuracy_hflip", "epochs", "train_seconds", "latency_ms_b64", "latency_ms_b1", "runtime",
                   "runtime_b1")


def runs_csv(runs: Sequence[RunResult]) -> str:
    """One row per run (:data:`RUNS_CSV_FIELDS`; empty where a run lacks the figure, the latencies
    without a latency table). ``runtime``: the fastest runtime at batch 64, ``runtime_b1`` at 224x224
    batch 1."""
    return _csv_text(RUNS_CSV_FIELDS, [
        (run.variant, run.seed, f"{run.width:g}", run.trainable_params, run.computations, run.test_accuracy,
         run.test_accuracy_hflip_tta, run.epochs, run.train_seconds, run.latency_ms_b64, run.latency_ms_b1,
         run.runtime, run.runtime_b1) for run in runs])


# the columns of a latency table (benchmarks/study_latency.py writes it; gpconv report --latency reads it)
LATENCY_FIELDS = ("variant", "runtime", "latency_ms_b64", "runtime_b1", "latency_ms_b1")


def read_latency_table(path) -> Dict[str, dict]:
    """``{variant: {"runtime", "latency_ms_b64", "runtime_b1", "latency_ms_b1"}}`` of a latency CSV
    (:data:`LATENCY_FIELDS`; milliseconds per batch); ValueError (one line naming the file and the line)
    on a missing column or a latency that is not a number > 0."""
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


def attach_latencies(runs: Sequence[RunResult], path) -> None:
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
