"""Training: protocol pieces, run folder, resume after SIGKILL, NaN stop, one-line errors, DDP, real data."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED
from gpconv.experiments.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from gpconv.experiments.config import ModelConfig, TrainConfig
from gpconv.experiments.metrics import classification_report, evaluate_checkpoint
from gpconv.experiments.training import cyclical_lr, make_optimizer, train

CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"
# a tiny run: EfficientNet-B0 at 16x16 on 200 + 100 synthetic images, 2 batches of 8 per epoch
TINY = ["--arch", "efficientnet_b0", "--image-size", "16", "--dataset", "synthetic", "--synthetic-size", "200,100",
        "--batch-size", "8", "--max-train-batches", "2", "--threads", "1"]


def gpconv(*argv, env=None, **kwargs):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpconv.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300, **kwargs)


# `gpconv train` with a Callback of gpconv.experiments.training (argv[1], e.g. "KillAfterEpoch(1)") in a fresh process
TRAIN_WITH_CALLBACK = """
import os, signal, sys
from gpconv.cli import build_parser
from gpconv.cli.train import run_train
from gpconv.experiments.training import Callback

class KillAfterEpoch(Callback):  # SIGKILL this process right after epoch N's checkpoint
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, row):
        if epoch == self.epoch:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

class NanLossAtEpoch(Callback):  # the loss becomes NaN during epoch N
    def __init__(self, epoch):
        self.epoch = epoch

    def on_loss(self, epoch, step, loss):
        return loss * float("nan") if epoch == self.epoch else loss

callback = {"KillAfterEpoch": KillAfterEpoch, "NanLossAtEpoch": NanLossAtEpoch}[sys.argv[1]](int(sys.argv[2]))
run_train(build_parser().parse_args(sys.argv[3:]), callbacks=[callback])
"""


def gpconv_train_with(callback, epoch, *argv):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", TRAIN_WITH_CALLBACK, callback, str(epoch), "train", *argv],
                          capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)


def assert_one_line_error(result, message, code=2):
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cyclical_schedule_matches_the_reference():
    expected = [1e-3, 1.5e-3, 2e-3, 2.5e-3, 3e-3, 3.5e-3, 4e-3, 4e-3, 4e-3 * 0.85, 4e-3 * 0.85 ** 2]
    assert [cyclical_lr(e) for e in range(10)] == pytest.approx(expected)
    assert cyclical_lr(24) == pytest.approx(4e-3 * 0.85 ** 17)
    assert cyclical_lr(25) == pytest.approx(1e-3) and cyclical_lr(31) == pytest.approx(4e-3)


def test_optimizer_has_keras_rmsprop_defaults():
    group = make_optimizer([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    assert (group["lr"], group["alpha"], group["eps"], group["momentum"], group["centered"]) == (1e-3, 0.9, 1e-7, 0,
                                                                                                 False)


def test_adamw_starts_at_the_learning_rate_and_other_names_are_refused():
    """gpconv shrink's optimizer: AdamW's first step moves each weight by lr, RMSprop's (no bias correction) by
    about 3 lr, both in the sign of the gradient; an unknown optimizer is refused by the config and the factory."""
    from gpconv.experiments.config import TrainConfig

    steps = {}
    for name in ("adamw", "rmsprop"):
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = make_optimizer([weight], 1e-3, name)
        weight.grad = torch.tensor([0.5, -2.0, 1e-3])
        optimizer.step()
        steps[name] = weight.detach().abs()
    assert isinstance(make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3, "adamw"), torch.optim.AdamW)
    assert steps["adamw"] == pytest.approx(torch.full((3,), 1e-3), rel=1e-3)
    assert steps["rmsprop"] == pytest.approx(torch.full((3,), 1e-3 / 0.1 ** 0.5), rel=1e-3)
    with pytest.raises(ValueError, match="rmsprop or adamw"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3, "sgd")
    with pytest.raises(ValueError, match="optimizer must be one of rmsprop, adamw"):
        TrainConfig(dataset="synthetic", output="unused", optimizer="sgd")


def test_classification_report_precision_recall_f1():
    confusion = torch.tensor([[3, 1], [0, 2]])  # rows: true class, columns: predicted
    report = classification_report(confusion, ["a", "b"])
    assert report["a"] == pytest.approx({"precision": 1.0, "recall": 0.75, "f1": 6 / 7, "support": 4})
    assert report["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["macro_avg"]["f1"] == pytest.approx((6 / 7 + 0.8) / 2)


def test_checkpoints_load_with_weights_only_and_corrupt_ones_are_one_line_errors(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"format": "gpconv-checkpoint-v1", "model": {"w": torch.ones(2)}, "config": {"a": 1}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 2-epoch tiny run through the CLI."""
    output = tmp_path_factory.mktemp("runs") / "full"
    result = gpconv("train", *TINY, "--epochs", "2", "--seed", "1", "--hflip-tta", "--output", str(output))
    assert result.returncode == 0, result.stderr
    return output, result


def test_run_folder_has_everything(tiny_run):
    output, result = tiny_run
    assert {"config.json", "history.csv", "metrics.json", "training_curves.png", "last.pt", "best.pt"} <= {
        p.name for p in output.iterdir()}
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]
    metrics = json.loads((output / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_epoch", "trainable_params", "computations", "macs", "per_class"):
        assert key in metrics
    assert metrics["trainable_params"] == 4_020_358 and metrics["hflip_tta"] is True and metrics["test_images"] == 100
    assert set(metrics["per_class"]) >= {"disc", "two-dots", "macro_avg"}
    assert (output / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (output / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss") and len(lines) == 3
    assert "test accuracy" in result.stdout
    checkpoint = load_checkpoint(output / "best.pt")
    assert checkpoint["model_config"]["arch"] == "efficientnet_b0" and checkpoint["model_config"]["image_size"] == 16


def test_evaluate_rebuilds_the_model_from_the_checkpoint(tiny_run, tmp_path):
    output, _ = tiny_run
    metrics = json.loads((output / "metrics.json").read_text())
    result = gpconv("evaluate", "--checkpoint", str(output / "best.pt"), "--hflip-tta", "--json",
                    str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert evaluated["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert "test accuracy" in result.stdout and "precision" in result.stdout


def test_resume_after_sigkill_reaches_the_same_metrics(tiny_run, tmp_path):
    full, _ = tiny_run
    output = tmp_path / "killed"
    killed = gpconv_train_with("KillAfterEpoch", 1, *TINY, "--epochs", "2", "--seed", "1", "--hflip-tta", "--output",
                               str(output))
    assert killed.returncode == -signal.SIGKILL
    assert (output / "last.pt").exists() and not (output / "metrics.json").exists()
    assert load_checkpoint(output / "last.pt")["epoch"] == 1
    refused = gpconv("train", *TINY, "--epochs", "2", "--seed", "1", "--hflip-tta", "--output", str(output))
    assert_one_line_error(refused, "already holds a run")
    resumed = gpconv("train", *TINY, "--epochs", "2", "--seed", "1", "--hflip-tta", "--output", str(output),
                     "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    expected, actual = (json.loads((d / "metrics.json").read_text()) for d in (full, output))
    for key in ("test_accuracy", "test_loss", "best_epoch", "best_val_accuracy"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    for name, row in expected["per_class"].items():
        assert actual["per_class"][name] == pytest.approx(row, rel=1e-6, abs=1e-9), name
    assert (output / "history.csv").read_text().split("\n")[1].split(",")[:6] == \
        (full / "history.csv").read_text().split("\n")[1].split(",")[:6]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    output = tmp_path / "nan"
    result = gpconv_train_with("NanLossAtEpoch", 2, *TINY, "--epochs", "3", "--output", str(output))
    assert_one_line_error(result, "loss became nan at epoch 2", code=3)
    assert load_checkpoint(output / "last.pt")["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in load_checkpoint(output / "last.pt")["model"].values()
               if t.is_floating_point())


@pytest.mark.parametrize("argv,message", [
    (["train", "--arch", "efficientnet_b0", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar",
      "--epochs", "1", "--output", "OUT"], "cifar10 files not found: expected /nonexistent/cifar/cifar-10-batches-py"),
    (["train", "--arch", "efficientnet_b0", "--dataset", "folder", "--data-dir", "/nonexistent/images",
      "--epochs", "1", "--output", "OUT"], "data directory /nonexistent/images does not exist"),
    (["train", "--arch", "efficientnet_b0", "--dataset", "imagenet", "--output", "OUT"], "invalid choice: 'imagenet'"),
    (["train", "--arch", "resnet9000", "--dataset", "synthetic", "--output", "OUT"], "invalid choice: 'resnet9000'"),
    (["evaluate", "--checkpoint", "CORRUPT"], "is corrupt or not a gpconv checkpoint"),
    (["evaluate", "--checkpoint", "/nonexistent/best.pt"], "does not exist"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    argv = [str(tmp_path / "out") if a == "OUT" else str(corrupt) if a == "CORRUPT" else a for a in argv]
    result = gpconv(*argv, env={"GPCONV_CIFAR10_URL": "http://127.0.0.1:9/offline.tar.gz"})
    assert_one_line_error(result, message)


def test_ddp_two_processes_gloo_write_the_same_metrics(tiny_run, tmp_path):
    full, _ = tiny_run
    output = tmp_path / "ddp"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as probe:  # a free loopback port (torchrun's static rendezvous needs a real one)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "gpconv.cli", "train", *TINY, "--epochs", "1", "--hflip-tta", "--device", "cpu",
         "--output", str(output)],
        capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics) == set(json.loads((full / "metrics.json").read_text()))
    assert metrics["world_size"] == 2 and metrics["test_images"] == 100  # every test image counted once
    assert load_checkpoint(output / "last.pt")["epoch"] == 1
    assert result.stdout.count("test accuracy") == 1  # printed by rank 0 only


@pytest.mark.skipif(not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir(), reason="CIFAR-10 subset not present")
def test_real_cifar10_subset_trains_a_few_batches_and_evaluates(tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig(dataset="cifar10", data_dir=str(CIFAR_SUBSET), output=str(tmp_path / "cifar"), epochs=1,
                         batch_size=16, max_train_batches=3, eval_batch_size=128)
    metrics = train(config, ModelConfig("efficientnet_b0", channels_per_group=16, image_size=16), log=lambda _: None)
    assert metrics["test_images"] == 1017 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert set(metrics["per_class"]) >= {"airplane", "truck"}
    evaluated = evaluate_checkpoint(tmp_path / "cifar" / "best.pt")
    assert evaluated["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_lr_cycle_sets_the_schedule_length(tmp_path):
    assert cyclical_lr(4, cycle=4) == pytest.approx(1e-3) and cyclical_lr(3, cycle=4) == pytest.approx(2.5e-3)
    with pytest.raises(ValueError, match="lr_cycle"):
        TrainConfig(dataset="synthetic", output=str(tmp_path), lr_cycle=0)
    config = TrainConfig(dataset="synthetic", output=str(tmp_path / "run"), epochs=3, lr_cycle=2, batch_size=8,
                         max_train_batches=1, synthetic_size=[40, 20], augment=False)
    train(config, ModelConfig("efficientnet_b0", image_size=16), log=lambda line: None)
    lrs = [float(line.split(",")[1]) for line in (tmp_path / "run" / "history.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([1e-3, 1.5e-3, 1e-3])


def test_train_and_sweep_build_the_same_model_by_default():
    """One default per setting: without --activation, gpconv train uses the family's activation, as a sweep does."""
    from gpconv.cli import build_parser
    from gpconv.experiments.sweep import expand_runs

    args = build_parser().parse_args(["train", "--arch", "mobilenet_v3_large", "--dataset", "synthetic", "--output", "x"])
    run, = expand_runs({"arch": "mobilenet_v3_large", "dataset": "synthetic", "variants": ["baseline"]})
    assert args.activation is None and run.model_config().activation is None
    assert ModelConfig("mobilenet_v3_large").activation is None


def test_callbacks_see_every_loss_and_every_epoch_row(tmp_path):
    from gpconv.experiments.training import Callback

    class Recorder(Callback):
        def __init__(self):
            self.steps, self.rows = [], []

        def on_loss(self, epoch, step, loss):
            self.steps.append((epoch, step))
            return loss

        def on_epoch_end(self, epoch, row):
            self.rows.append((epoch, row))

    recorder = Recorder()
    config = TrainConfig(dataset="synthetic", output=str(tmp_path / "run"), epochs=2, batch_size=8,
                         max_train_batches=2, synthetic_size=[40, 20], augment=False)
    train(config, ModelConfig("efficientnet_b0", image_size=16), callbacks=[recorder], log=lambda line: None)
    assert recorder.steps == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [epoch for epoch, _ in recorder.rows] == [1, 2] and [row["epoch"] for _, row in recorder.rows] == [1, 2]
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()[1:]
    assert [float(line.split(",")[2]) for line in history] == pytest.approx([row["train_loss"] for _, row in recorder.rows])


def test_a_last_batch_of_one_image_joins_the_one_before(tmp_path):
    """17 images in batches of 8 leave one image; at 16x16 EfficientNet's last maps are 1x1, where batch norm
    cannot train on a single image: that image is trained on with the batch before it."""
    from gpconv.experiments.training import Callback

    class Steps(Callback):
        def __init__(self):
            self.steps = []

        def on_loss(self, epoch, step, loss):
            self.steps.append(step)
            return loss

    steps = Steps()
    config = TrainConfig(dataset="synthetic", output=str(tmp_path / "run"), epochs=1, batch_size=8,
                         synthetic_size=[17, 8], augment=False)
    train(config, ModelConfig("efficientnet_b0", image_size=16), callbacks=[steps], log=lambda line: None)
    assert steps.steps == [1, 2]
