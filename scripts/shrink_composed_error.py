"""How far each MBConv block's output is from its dense teacher's in the composed k16 model, on the 1,017 test
images (held out from the fit): per-layer fit only vs fit + block reconstruction (docs/results.md, "Shrinking a
trained model"). Writes ``docs/results/shrink_composed_error.csv``: one row per (teacher, start, block), the
relative squared error ``sum (s - t)^2 / sum t^2`` of the block's output over the test images.

Run from the repository root after ``scripts/shrink_study.py --only '*k16-e0-*'``::

    .venv/bin/python scripts/shrink_composed_error.py
"""

import csv
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shrink_study import ROOT, RUNS_DIR, TEACHERS  # noqa: E402  (the study's teachers and run folders)

from gpconv.experiments.checkpoint import load_model_from_checkpoint  # noqa: E402
from gpconv.experiments.data import load_dataset, to_float  # noqa: E402

OUTPUT = ROOT / "docs/results/shrink_composed_error.csv"
STARTS = {"fit": "fit-k16-e0-teacher{}", "fit+blocks": "blocks-k16-e0-teacher{}"}


@torch.no_grad()
def block_outputs(model, images):
    """Each child of ``model.features``'s output on ``images`` (batches of 128), in order."""
    outputs = {}
    for batch in images.split(128):
        x = batch
        for name, block in model.features.named_children():
            x = block(x)
            outputs.setdefault(name, []).append(x)
    return {name: torch.cat(values) for name, values in outputs.items()}


def main():
    torch.set_num_threads(1)
    splits = load_dataset("cifar10", str(ROOT.parent / "shared/data/cifar10-subset"), image_size=32, seed=0)
    images = to_float(splits.test.images)
    rows = []
    for seed, checkpoint in TEACHERS.items():
        teacher = block_outputs(load_model_from_checkpoint(ROOT / checkpoint)[0].eval(), images)
        for start, pattern in STARTS.items():
            model = load_model_from_checkpoint(ROOT / RUNS_DIR / pattern.format(seed) / "best.pt")[0].eval()
            for name, output in block_outputs(model, images).items():
                target = teacher[name]
                error = ((output - target).double().pow(2).sum() / target.double().pow(2).sum()).item()
                rows.append({"teacher": seed, "start": start, "block": f"features.{name}",
                             "relative_error": round(error, 4)})
        print(f"teacher {seed} done", flush=True)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=("teacher", "start", "block", "relative_error"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    temporary = OUTPUT.with_suffix(".csv.tmp")
    temporary.write_text(out.getvalue())
    temporary.replace(OUTPUT)
    print(f"{len(rows)} rows in {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
