"""Is training healthy? Short, controlled runs on the real CIFAR-10 subset (issue 10, docs/training.md).

Every run sees the same batches (seeded order, no augmentation) at a constant learning rate (RMSprop with
Keras' defaults, lr 1e-3, batch 64) and starts from the same seed. Three experiments:

* ``init``: EfficientNet-B0 (dense) with four initialisations: depthwise kernels by PyTorch's fan-out
  (``channels*k*k``, what gpconv did before) or Keras' (``k*k``), and the classifier by Keras' rule
  (uniform ±1/sqrt(classes)) or PyTorch's ``nn.Linear`` default (±1/sqrt(features)).
* ``execution``: kEffNet-B0 V2 16ch from identical weights, trained with the fast execution (default) and
  with the straightforward one (``set_execution(model, "straightforward")``, no recomputation), plus the
  dense baseline as a plain ``nn.Conv2d`` model: the per-step losses of the two k executions must agree
  over the first steps (later, float rounding differences grow as between any two runs) and end close.
* ``batchnorm``: after each ``init`` run, validation accuracy in eval mode with the running batch-norm
  statistics (Keras momentum 0.99) and with statistics recomputed over 10 training batches.

Writes ``docs/results/training_health.csv`` (one row per run) and prints a Markdown table.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/training_health.py --steps 150
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpconv.core.block import set_execution, set_recompute  # noqa: E402
from gpconv.experiments.data import load_dataset, to_float  # noqa: E402
from gpconv.models import create_model, init_classifier  # noqa: E402
from gpconv.experiments.metrics import recalibrate_batch_norm  # noqa: E402
from gpconv.experiments.training import make_optimizer  # noqa: E402
from gpconv.io import atomic_write_text, render_table  # noqa: E402

FIELDS = ("experiment", "run", "trainable_params", "initial_loss", "final_loss", "eval_val_accuracy_running_bn",
          "eval_val_accuracy_recomputed_bn", "loss_gap_to_fast_first_10_steps")


def pytorch_depthwise_init(model: nn.Module) -> None:
    """What gpconv did before: ``kaiming_normal_(mode='fan_out')`` on depthwise kernels (fan-out channels*k*k)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            nn.init.kaiming_normal_(module.weight, mode="fan_out")


def build(channels_per_group, depthwise: str, classifier: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", 10, channels_per_group=channels_per_group, skip_strides=1)
    if depthwise == "pytorch":
        pytorch_depthwise_init(model)
    return init_classifier(model, classifier).to(memory_format=torch.channels_last)


def batches(splits, steps: int, batch_size: int):
    generator = torch.Generator().manual_seed(0)
    taken = 0
    while taken < steps:
        for indices in torch.randperm(len(splits.train), generator=generator).split(batch_size):
            if taken == steps:
                return
            images = to_float(splits.train.images[indices]).contiguous(memory_format=torch.channels_last)
            yield images, splits.train.labels[indices]
            taken += 1


def train_steps(model: nn.Module, splits, steps: int, batch_size: int):
    optimizer = make_optimizer(model.parameters(), 1e-3)
    model.train()
    losses = []
    for images, labels in batches(splits, steps, batch_size):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def val_accuracy(model: nn.Module, splits) -> float:
    model.eval()
    images = to_float(splits.val.images).contiguous(memory_format=torch.channels_last)
    predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(128)])
    return float((predicted == splits.val.labels).float().mean())


def summary_row(experiment: str, name: str, model: nn.Module, losses, splits, batch_size: int, gap=None) -> dict:
    window = max(1, len(losses) // 6)
    row = {"experiment": experiment, "run": name,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "initial_loss": round(losses[0], 4), "final_loss": round(sum(losses[-window:]) / window, 4),
           "eval_val_accuracy_running_bn": round(val_accuracy(model, splits), 4),
           "loss_gap_to_fast_first_10_steps": "" if gap is None else f"{gap:.2e}"}
    recalibrate_batch_norm(model, splits.train, 10, batch_size, torch.device("cpu"))
    row["eval_val_accuracy_recomputed_bn"] = round(val_accuracy(model, splits), 4)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "training_health.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = load_dataset("cifar10", args.data_dir, image_size=32, seed=0)
    rows = []
    for depthwise in ("pytorch", "keras"):
        for classifier in ("family", "torch"):
            name = f"baseline, depthwise {depthwise} init, classifier {'keras' if classifier == 'family' else 'torch'} init"
            model = build(None, depthwise, classifier)
            rows.append(summary_row("init", name, model, train_steps(model, splits, args.steps, args.batch_size),
                                    splits, args.batch_size))
            print(rows[-1], flush=True)
    fast = build(16, "keras", "torch")
    fast_losses = train_steps(fast, splits, args.steps, args.batch_size)
    rows.append(summary_row("execution", "v2-16ch fast execution", fast, fast_losses, splits, args.batch_size, 0.0))
    straightforward = set_recompute(set_execution(build(16, "keras", "torch"), "straightforward"), "none")
    losses = train_steps(straightforward, splits, args.steps, args.batch_size)
    # the largest per-step difference over the first 10 steps (later, float rounding differences grow
    # as in any two runs of a chaotic optimisation; the final losses are compared instead)
    gap = max(abs(a - b) for a, b in zip(losses[:10], fast_losses[:10]))
    rows.append(summary_row("execution", "v2-16ch straightforward execution, no recompute", straightforward, losses,
                            splits, args.batch_size, gap))
    print(rows[-2:], flush=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, buffer.getvalue())
    print(f"\n{args.steps} steps of {args.batch_size}, lr 1e-3 constant, no augmentation; ln(10) = {math.log(10):.4f}\n")
    print(render_table(FIELDS[1:], [[str(row[key]) for key in FIELDS[1:]] for row in rows], markdown=True))
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
