"""The report's plots: accuracy against a cost with the Pareto front, and the runs' training curves."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from .plots import load_pyplot, save_and_close
from .report_tables import RunResult, VariantSummary, pareto_front

__all__ = ["tradeoff_plot", "curves_plot"]


def tradeoff_plot(summaries: Sequence[VariantSummary], attribute: str, label: str, path: Path, title: str) -> Path:
    """Mean test accuracy of each variant against ``attribute`` (error bars: the seeds' standard
    deviation), with the Pareto front of the means."""
    plt = load_pyplot()
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
        from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1-2-5 labels: all 2-9 ones collide
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))
        axis.xaxis.set_minor_formatter(NullFormatter())
        label += " (log scale)"
    axis.set_xlabel(label)
    axis.set_ylabel("test accuracy")
    axis.set_title(textwrap.fill(title, 80), fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return save_and_close(figure, path)


def curves_plot(runs: Sequence[RunResult], path: Path, title: str) -> Path:
    """Training accuracy, validation accuracy and training loss of every run with a history, per epoch
    (three panels, one line per run in the same colour across them)."""
    plt = load_pyplot()
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
    return save_and_close(figure, path)
