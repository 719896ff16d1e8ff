"""Issue 20's next step, as a prototype (not yet in gpconv.core.fit): block-wise reconstruction of a fitted
kEffNet-B0 16ch start, then ``gpconv shrink``'s 6 epochs from it (``--start-from``).

The per-layer fit (``fit_to_dense``) matches each block to its dense layer on the *teacher's* inputs. In the
composed model the errors then compound: on teacher 0, the MBConv blocks' outputs end 14-36x off in relative
squared error. Here each MBConv block from the sixth on (``features.5`` onwards) is trained in turn, with the
whole block's parameters (batch norms on their running statistics), 100 Adam steps of 128 images from lr 1e-3.
The block gets the inputs the shrunk model itself gives it, on 1,024 training images, and its target is the
teacher block's output. Measured once (2026-12-07, AMD EPYC, 3 runs on 2 cores), writing to /tmp/proto/runs.
Test accuracy, before fine-tuning and after 6 epochs, for teachers 0/1/2:

* 0 epochs: 0.475 / 0.322 / 0.443, against the per-layer fit's 0.398 / 0.259 / 0.362;
* 6 epochs: 0.509 / 0.516 / 0.499, mean 0.508, against the per-layer fit's 0.480 / 0.495 / 0.495.

Run from the repository root: ``OMP_NUM_THREADS=1 python scripts/shrink_blockwise_prototype.py TEACHER``
(0, 1 or 2; needs the study's 0-epoch fitted runs' best.pt, ``scripts/shrink_study.py --only 'fit-k16-e0-*'``).
"""
import json, shutil, subprocess, sys, time, torch, torch.nn.functional as F
from pathlib import Path
from gpconv.experiments.checkpoint import load_model_from_checkpoint
from gpconv.experiments.data import load_dataset
from gpconv.experiments.training import to_float
from gpconv.experiments.metrics import evaluate_model
seed = int(sys.argv[1]); steps = 100
teachers = {0: "docs/results/cpu_cifar10_subset_runs/baseline-seed0/best.pt",
            1: "docs/results/shrink_teachers/baseline-seed1/best.pt",
            2: "docs/results/shrink_teachers/baseline-seed2/best.pt"}
torch.manual_seed(0); torch.set_num_threads(1)
fitted = Path(f"docs/results/shrink_cifar10_subset_runs/fit-k16-e0-teacher{seed}")
s = load_model_from_checkpoint(fitted / "best.pt")[0]
t = load_model_from_checkpoint(teachers[seed])[0].eval()
splits = load_dataset("cifar10", "../shared/data/cifar10-subset", image_size=32, seed=0)
x = to_float(splits.train.images[torch.randperm(len(splits.train))[:1024]])
started = time.time()
xs = xt = x
for name, tb in t.features.named_children():
    sb = s.features.get_submodule(name)
    with torch.no_grad():
        yt = tb(xt)
    if int(name) >= 5:
        sb.eval()
        opt = torch.optim.Adam(sb.parameters(), lr=1e-3)
        for step in range(steps):
            idx = torch.randint(0, len(xs), (128,))
            loss = F.mse_loss(sb(xs[idx]), yt[idx]) / yt[idx].pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        xs = sb(xs); xt = yt
e0 = evaluate_model(s.eval(), splits.test, splits.num_classes, batch_size=128).accuracy
print(f"teacher {seed}: block-wise {time.time() - started:.0f} s, e0 test {e0:.4f}", flush=True)
start = Path(f"/tmp/shrink_blockwise/blockwise-k16-e0-teacher{seed}")
if start.exists(): shutil.rmtree(start)
shutil.copytree(fitted, start)
saved = torch.load(fitted / "best.pt", weights_only=True)
saved["model"] = s.state_dict()
torch.save(saved, start / "best.pt")
out = f"/tmp/shrink_blockwise/blockwise-k16-e6-teacher{seed}"
subprocess.run([sys.executable, "-m", "gpconv", "shrink", "--checkpoint", teachers[seed], "--channels-per-group", "16",
                "--epochs", "6", "--threads", "1", "--start-from", str(start), "--output", out], check=False)
print(f"teacher {seed}: e6", json.loads(Path(out, "metrics.json").read_text())["test_accuracy"])
