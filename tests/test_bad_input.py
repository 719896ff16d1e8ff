"""Issue 13: bad input and faults end in one line, without a traceback, and no pre-existing file changes."""

import json
import os
import pickle
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from gpconv.cli import main
from gpconv.core.counting import count_computations
from gpconv.experiments.data import DataError, load_dataset
from gpconv.models import create_model, list_models, min_input_size
from gpconv.models.registry import _REGISTRY
from gpconv.io import atomic_write, remove_stale_temporaries
from gpconv.experiments.checkpoint import load_checkpoint

TINY = ["--arch", "efficientnet_b0", "--image-size", "16", "--dataset", "synthetic", "--synthetic-size", "60,20",
        "--batch-size", "8", "--max-train-batches", "1", "--threads", "1", "--epochs", "1", "--no-augment"]


def snapshot(folder):
    """Every file under ``folder``: relative path -> (bytes, mode)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def refused(argv, capsys, folder, message, code=2):
    """Run the CLI in-process; assert exit != 0, one line on stderr, and ``folder`` unchanged."""
    before = snapshot(folder)
    try:
        status = main([str(a) for a in argv])
    except SystemExit as error:  # argparse's one-line errors
        status = error.code
    assert status == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(folder) == before
    return err


def gpconv(*argv, preexec_fn=None):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gpconv.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env=environment, timeout=300, preexec_fn=preexec_fn)


def assert_one_line(result, message):
    assert result.returncode not in (0, -signal.SIGKILL), result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run, trained in-process."""
    output = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", *TINY, "--output", str(output)]) == 0
    return output


# ------------------------------------------------------------------------------------------ outputs


def test_train_refuses_a_folder_with_a_run_even_without_last_pt(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "history.csv", "best.pt", "metrics.json", "notes.txt"):
        (other / name).write_bytes((run / name).read_bytes() if (run / name).exists() else b"mine")
    refused(["train", *TINY, "--output", other], capsys, tmp_path, "holds a finished run without last.pt")
    refused(["train", *TINY, "--output", other, "--resume"], capsys, tmp_path, "without last.pt")
    refused(["train", *TINY, "--output", other, "--resume", "--overwrite"], capsys, tmp_path, "exclude each other")


@pytest.mark.parametrize("left", [("config.json",), ("config.json", "best.pt")])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_run_killed_before_its_first_epoch_ended_resumes_by_starting_again(command, left, run, tmp_path, capsys):
    """Before the first last.pt a run folder holds config.json, and best.pt once epoch 1's (or a shrink's
    epoch-0) weights are saved: --resume (and sweep, which always resumes) starts such a run again
    instead of refusing it with a remedy sweep does not have."""
    folder = tmp_path / "s" / "baseline"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if "best.pt" in left:
        (folder / "best.pt").write_bytes((run / "best.pt").read_bytes())  # epoch 1's
    (folder / "notes.txt").write_text("mine")
    if command == "train":
        assert main(["train", *TINY, "--output", str(folder), "--resume"]) == 0
    else:
        sweep_flags = [a for a in TINY if a not in ("--synthetic-size", "60,20", "--no-augment")]
        assert main(["sweep", *sweep_flags, "--variants", "baseline", "--output", str(folder.parent)]) == 0
    assert json.loads((folder / "metrics.json").read_text())["epochs"] == 1
    assert json.loads((folder / "config.json").read_text())["train"]["epochs"] == 1
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "best.pt").stat().st_size > 100


def test_a_best_pt_of_a_later_epoch_kept_on_its_own_is_not_restarted_over(run, tmp_path, capsys):
    """config.json + best.pt of epoch 5 (a user kept only those) is no run killed in its first epoch:
    --resume refuses rather than replacing that best.pt."""
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    saved = torch.load(run / "best.pt", weights_only=True)
    torch.save({**saved, "epoch": 5}, folder / "best.pt")
    refused(["train", *TINY, "--output", folder, "--resume"], capsys, tmp_path, "without last.pt")


def test_a_finished_run_without_last_pt_names_the_remedy_that_works(tmp_path, capsys):
    """A finished run without last.pt (shrink --epochs 0 writes one) cannot be resumed: the refusal says
    --overwrite, not --resume; a file given as --output is named as such."""
    folder = tmp_path / "finished"
    folder.mkdir()
    for name in ("config.json", "metrics.json", "best.pt"):
        (folder / name).write_text("{}")
    err = refused(["train", *TINY, "--output", folder], capsys, tmp_path, "holds a finished run without last.pt")
    assert "--overwrite" in err and "--resume" not in err
    (tmp_path / "afile").write_text("mine")
    refused(["train", *TINY, "--output", tmp_path / "afile"], capsys, tmp_path, "is a file, not a folder")
    sweep = [a for a in TINY if a not in ("--synthetic-size", "60,20", "--no-augment")]
    refused(["sweep", *sweep, "--variants", "baseline", "--output", tmp_path / "afile"], capsys, tmp_path,
            "is a file, not a folder")


def test_overwrite_replaces_only_run_files(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text("old")
    (folder / "notes.txt").write_text("mine")
    assert main(["train", *TINY, "--output", str(folder), "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("flag,value", [("--seed", "1"), ("--lr", "0.002"), ("--batch-size", "4"),
                                        ("--synthetic-size", "70,20"), ("--channels-per-group", "16")])
def test_resume_with_another_setting_is_refused_and_names_it(run, flag, value, capsys):
    name = flag.lstrip("-").replace("-", "_")
    argv = [a for a in TINY] + [flag, value]
    err = refused(["train", *argv, "--output", run, "--resume"], capsys, run.parent, "other settings")
    assert name in err


def test_demo_keeps_an_existing_folder(tmp_path, capsys):
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "mine.txt").write_text("keep")
    refused(["demo", "--output", folder], capsys, tmp_path, "already holds a run")
    assert capsys.readouterr().out == ""  # refused before the table


def test_report_does_not_write_into_a_run_or_over_a_report(run, tmp_path, capsys):
    refused(["report", run, "--output", run], capsys, run.parent, "is a run folder")
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.md").write_text("my notes")
    refused(["report", run, "--output", report], capsys, tmp_path, "already holds results.md")


def test_evaluate_json_and_cam_do_not_replace_files(run, tmp_path, capsys):
    (tmp_path / "eval.json").write_text("mine")
    refused(["evaluate", "--checkpoint", run / "best.pt", "--json", tmp_path / "eval.json"], capsys, tmp_path,
            "already holds eval.json")
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "cam_grid.png").write_text("mine")
    refused(["cam", "--checkpoint", run / "best.pt", "--images", "1", "--output", tmp_path / "cam"], capsys,
            tmp_path, "already holds cam_grid.png")


def test_sweep_refuses_a_run_folder_and_a_foreign_plan(run, tmp_path, capsys):
    sweep = ["sweep", "--arch", "efficientnet_b0", "--variants", "baseline", "--dataset", "synthetic",
             "--image-size", "16", "--epochs", "1", "--device", "cpu"]
    refused([*sweep, "--output", run], capsys, run.parent, "not of a sweep")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("[1, 2]")
    refused([*sweep, "--output", tmp_path / "s"], capsys, tmp_path, "not a gpconv sweep plan")


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    refused(["train", *TINY, "--output", tmp_path / "file" / "run"], capsys, tmp_path, "cannot write to")


# ------------------------------------------------------------------------------------------ faults


def test_atomic_write_uses_the_umask_and_leaves_nothing_on_failure(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", lambda out: out.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640

    def fail(out):
        out.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:1] . file write failed")

    with pytest.raises(OSError, match="cannot write .*a.txt"):
        atomic_write(tmp_path / "a.txt", fail)
    assert (tmp_path / "a.txt").read_bytes() == b"x" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_stale_temporaries_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    for name in (".last.pt.ab12cd_9.tmp", ".last.pt.notes.tmp", "last.pt", ".mine.ab12cd34.tmp"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in remove_stale_temporaries(tmp_path, ["last.pt"])] == [".last.pt.ab12cd_9.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".last.pt.notes.tmp", ".mine.ab12cd34.tmp", "last.pt"]


def test_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("last.pt", "best.pt", "config.json", "history.csv"):
        (folder / name).write_bytes((run / name).read_bytes())
    before = snapshot(folder)

    def small_disk():  # writes past 1 MB fail (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = gpconv("train", *TINY[:-3], "--epochs", "2", "--no-augment", "--output", folder, "--resume",
                    preexec_fn=small_disk)
    assert_one_line(result, "cannot write")
    after = snapshot(folder)
    assert after["last.pt"] == before["last.pt"]
    assert not [name for name in after if name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("argv,message", [
    (["table", "--input-size", "0"], "too small for efficientnet_b0"),
    (["table", "--arch", "inception_v3", "--input-size", "32", "--variants", "baseline"], "at least 75x75"),
    (["summary", "mobilenet", "--input-size", "1"], "at least 32x32"),
    (["train", *TINY, "--arch", "mobilenet", "--output", "OUT"], "too small for mobilenet"),
    (["train", *TINY, "--device", "cuda:0", "--output", "OUT"], "device"),
    (["train", *TINY, "--device", "tpu", "--output", "OUT"], "unknown device"),
    (["train", *TINY, "--lr", "nan", "--output", "OUT"], "a number > 0"),
    (["train", *TINY, "--lr", "-1", "--output", "OUT"], "a number > 0"),
    (["train", *TINY, "--lr", "0", "--output", "OUT"], "a number > 0"),
    (["train", *TINY, "--seed", "-1", "--output", "OUT"], "an integer >= 0"),
])
def test_bad_options_are_one_line(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    refused(argv, capsys, tmp_path, message)
    assert not (tmp_path / "out").exists()


def test_every_family_runs_at_its_minimum_input_size_and_not_below():
    for arch in list_models():
        for skip in range(_REGISTRY[arch].max_skip_strides + 1):
            if arch.startswith("efficientnet_b") and arch != "efficientnet_b0" or (arch != "mobilenet" and skip > 1):
                continue
            size = min_input_size(arch, skip)
            with torch.device("meta"):
                model = create_model(arch, 10, skip_strides=skip).eval()
            model(torch.empty(1, 3, size, size, device="meta"))
            if size > 1:
                with pytest.raises(RuntimeError):
                    model(torch.empty(1, 3, size - 1, size - 1, device="meta"))


def test_count_computations_of_a_too_small_input_is_a_value_error():
    with torch.device("meta"):
        model = create_model("mobilenet")
    for size in (0, 1, (3,), "a"):
        with pytest.raises(ValueError):
            count_computations(model, size)


@pytest.mark.parametrize("yaml_text,message", [
    ("epochs: 0", "epochs in group 1"), ("lr: -1", "lr in group 1"), ("batch_size: 2.5", "batch_size"),
    ("epochs: true", "epochs"), ("augment: 'no'", "augment"), ("channels_per_group: [0]", "channels_per_group"),
    ("image_size: 8\narch: inception_v3", "at least 75x75"),
])
def test_sweep_yaml_numbers_follow_the_cli_rules(yaml_text, message, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("arch: efficientnet_b0\nvariants: [baseline, v2]\nchannels_per_group: [16]\n"
                      "dataset: synthetic\n" + yaml_text + "\n")
    if "arch: inception_v3" in yaml_text:
        config.write_text(config.read_text().replace("arch: efficientnet_b0\n", ""))
    refused(["sweep", "--config", config, "--output", tmp_path / "s"], capsys, tmp_path, message)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ data


class _Touch:
    def __reduce__(self):
        return (os.system, ("touch EXECUTED",))


def _cifar_folder(root, batch=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {b"data": np.zeros((20, 3072), np.uint8), b"labels": [i % 10 for i in range(20)]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(good if batch is None or name != "data_batch_1" else batch))
    return folder


@pytest.mark.parametrize("batch,message", [
    ({b"data": _Touch(), b"labels": [0]}, "posix.system"),
    ({b"labels": [0, 1]}, "has no data"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "N x 3072"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "negative labels"),
    ([1, 2, 3], "expected a mapping"),
])
def test_crafted_or_damaged_cifar_batches_are_refused_and_never_run(batch, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _cifar_folder(tmp_path, batch)
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load_dataset("cifar10", tmp_path, download=False)
    assert not (tmp_path / "EXECUTED").exists()


def test_cli_on_a_crafted_cifar_batch_is_one_line_and_runs_nothing(tmp_path):
    _cifar_folder(tmp_path / "data", {b"data": _Touch(), b"labels": [0]})
    result = gpconv("train", *TINY[:4], "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--output",
                    tmp_path / "out")
    assert_one_line(result, "which a data file may not")
    assert not (ROOT / "EXECUTED").exists() and not (tmp_path / "EXECUTED").exists()


def _images(folder, count):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(folder / f"{i}.png")


@pytest.mark.parametrize("layout,message", [
    ({"only": 30}, "classification needs at least 2"),
    ({"a": 30, "b": 0}, "has no readable image"),
    ({"a": 2, "b": 2}, "too small"),
])
def test_folder_datasets_need_two_classes_images_in_each_and_enough_for_the_splits(layout, message, tmp_path):
    for name, count in layout.items():
        _images(tmp_path / "data" / name, count)
    with pytest.raises(DataError, match=message):
        load_dataset("folder", tmp_path / "data", image_size=8)


def test_damaged_checkpoints_are_one_line(run, tmp_path, capsys):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    for key in ("rng", "model_config"):
        damaged = {k: v for k, v in checkpoint.items() if k != key}
        torch.save(damaged, tmp_path / f"no-{key}.pt")
    refused(["evaluate", "--checkpoint", tmp_path / "no-model_config.pt"], capsys, tmp_path, "has no model_config")
    folder = tmp_path / "resume"
    folder.mkdir()
    (folder / "last.pt").write_bytes((tmp_path / "no-rng.pt").read_bytes())
    refused(["train", *TINY, "--output", folder, "--resume"], capsys, tmp_path, "has no rng")
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


# ------------------------------------------------------------------------------------------ issue 22: files gpconv wrote


def _copy_run(run, folder):
    folder.mkdir(parents=True)
    for name in ("config.json", "history.csv", "metrics.json", "best.pt", "last.pt"):
        (folder / name).write_bytes((run / name).read_bytes())
    return folder


def _drop_column(text, column):
    rows = [line.split(",") for line in text.splitlines()]
    index = rows[0].index(column)
    return "\n".join(",".join(row[:index] + row[index + 1:]) for row in rows) + "\n"


@pytest.mark.parametrize("name,damage,message", [
    ("history.csv", lambda text: _drop_column(text, "seconds"), "history.csv has no column 'seconds'"),
    ("history.csv", lambda text: _drop_column(text, "epoch"), "history.csv has no column 'epoch'"),
    ("history.csv", lambda text: text[:text.index("\n") + 12], "history.csv line 2: column"),
    ("history.csv", lambda text: text.replace("\n1,", "\n1,x"), "history.csv line 2: column 'lr' is 'x"),
    ("config.json", lambda text: "[]", "config.json is not a gpconv file: it holds a list"),
    ("config.json", lambda text: text.replace('"seed": 0', '"seed": "zero"'), "field seed is 'zero'"),
    ("config.json", lambda text: text.replace('"arch": "efficientnet_b0"', '"arch": 3'), "model: field arch is 3"),
    ("config.json", lambda text: "{", "config.json is not valid JSON"),
    ("metrics.json", lambda text: text.replace('"trainable_params": ', '"trainable_params": "many", "x": '),
     "field 'trainable_params' is 'many'"),
    ("metrics.json", lambda text: json.dumps({**json.loads(text), "test_accuracy": 7}), "a number in [0, 1]"),
    ("metrics.json", lambda text: json.dumps({**json.loads(text), "hflip_tta": "no"}), "field 'hflip_tta'"),
    ("metrics.json", lambda text: "null", "metrics.json is not a gpconv file"),
    ("tta.json", lambda text: "[0.5]", "tta.json is not a gpconv file"),
    ("tta.json", lambda text: '{"test_accuracy": "high"}', "field 'test_accuracy' is 'high'"),
])
def test_report_on_damaged_run_files_is_one_line_naming_file_and_field(run, name, damage, message, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "runs" / "damaged")
    path = folder / name
    path.write_text(damage(path.read_text() if path.exists() else "{}"))
    refused(["report", folder, "--output", tmp_path / "report"], capsys, tmp_path, message)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("plan,message", [("[]", "holds a list"), ('{"runs": 3}', "field 'runs' is 3"),
                                          ('{"runs": [{"variant": "x"}]}', "runs[0] is not a run with a name")])
def test_report_and_sweep_refuse_a_damaged_sweep_plan(run, plan, message, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _copy_run(run, sweep / "baseline")
    (sweep / "sweep.json").write_text(plan)
    refused(["report", sweep, "--output", tmp_path / "report"], capsys, tmp_path, message)
    refused(["sweep", "--arch", "efficientnet_b0", "--variants", "baseline", "--dataset", "synthetic", "--image-size",
             "16", "--epochs", "1", "--device", "cpu", "--output", sweep], capsys, tmp_path, "not a gpconv sweep plan")


@pytest.mark.parametrize("key,value,message", [
    ("model_config", lambda c: {**c, "channels_per_group": "16"}, "field channels_per_group is '16'"),
    ("model_config", lambda c: {**c, "l_layer": 1}, "field l_layer is 1"),
    ("model_config", lambda c: [c], "model_config is not a mapping"),
    ("train_config", lambda c: {**c, "seed": 1.5}, "field seed is 1.5"),
    ("train_config", lambda c: {**c, "synthetic_size": "60,20"}, "field synthetic_size"),
    ("epoch", lambda c: "1", "its epoch is '1'"),
    ("class_names", lambda c: "0123456789", "class_names is not a list"),
    ("model", lambda c: [1, 2], "its model is not a mapping"),
    ("history", lambda c: [{"epoch": "one"}], "its history is not a list"),
    ("best", lambda c: {"value": "high"}, "its best is"),
    ("model_config", lambda c: {**c, "num_classes": 0}, "num_classes must be >= 1, got 0"),
])
def test_damaged_checkpoint_fields_are_one_line(run, key, value, message, tmp_path, capsys):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint[key] = value(checkpoint[key])
    torch.save(checkpoint, tmp_path / "best.pt")
    err = refused(["evaluate", "--checkpoint", tmp_path / "best.pt"], capsys, tmp_path, message)
    assert "best.pt is damaged" in err
    refused(["cam", "--checkpoint", tmp_path / "best.pt", "--output", tmp_path / "cam"], capsys, tmp_path, message)
    folder = tmp_path / "resume"
    folder.mkdir()
    (folder / "last.pt").write_bytes((tmp_path / "best.pt").read_bytes())
    refused(["train", *TINY, "--output", folder, "--resume"], capsys, tmp_path, message)


SWEEP = ["sweep", "--arch", "efficientnet_b0", "--variants", "baseline", "--dataset", "synthetic", "--image-size", "16",
         "--epochs", "1", "--max-train-batches", "1", "--device", "cpu", "--threads", "1"]


def _sweep_with_saved_run(run, tmp_path, finished: bool):
    """A sweep folder whose plan and run ``baseline`` were written before (the tiny run's files)."""
    sweep = tmp_path / "sweep"
    folder = _copy_run(run, sweep / "baseline")
    if finished:
        (folder / "tta.json").write_text(json.dumps({"test_accuracy": 0.1, "test_accuracy_hflip_tta": 0.1}))
    else:
        for name in ("metrics.json", "best.pt"):
            (folder / name).unlink()
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"name": "baseline", "arch": "efficientnet_b0"}]}))
    return sweep


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "interrupted"])
def test_a_sweep_refused_for_other_settings_writes_nothing(run, finished, tmp_path, capsys):
    sweep = _sweep_with_saved_run(run, tmp_path, finished)
    err = refused([*SWEEP, "--batch-size", "4", "--output", sweep], capsys, tmp_path, "trained with other settings")
    assert "batch_size 8 (now 4)" in err


@pytest.mark.parametrize("yaml_text,message", [
    ("seeds: [-1]", "seeds in group 1 (efficientnet_b0): expected an integer >= 0, got '-1'"),
    ("seeds: [2.7]", "seeds in group 1 (efficientnet_b0): expected an integer >= 0, got '2.7'"),
    ("seeds: [0, a]", "seeds in group 1 (efficientnet_b0): expected an integer >= 0, got 'a'"),
    ("seeds: [true]", "seeds in group 1"),
    ("seeds: [[1]]", "seeds in group 1"),
    ("seeds: 2.5", "seeds in group 1"),
    ("seed: 1.5", "seed in group 1"),
    ("channels_per_group: [16, x]", "channels_per_group in group 1"),
    ("variants: [baseline, 3]", "variants in group 1"),
    ("tag: ../../elsewhere", "tag in group 1"),
    ("tag: a/b", "tag in group 1"),
    ("tag: .hidden", "tag in group 1"),
    ("tag: [x]", "tag in group 1"),
    ("dataset: folder", "needs data_dir"),
    ("data_dir: [a]", "data_dir in group 1"),
    ("monitor: accuracy", "monitor in group 1"),
    ("groups: [{tag: ../x}]", "tag in group 1"),
    ("epochs: null", "epochs in group 1 (efficientnet_b0): expected a value, got null"),
    ("image_size: null", "image_size in group 1"),
    ("val_flips: null", "val_flips in group 1"),
])
def test_every_sweep_yaml_key_is_checked_like_its_flag(yaml_text, message, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("arch: efficientnet_b0\nvariants: [baseline, v2]\nchannels_per_group: [16]\n"
                      "dataset: synthetic\nimage_size: 16\n" + yaml_text + "\n")
    for argv in ([] if "data_dir" in message else ["--dry-run"], []):  # a dry run lists runs without data
        refused(["sweep", "--config", config, "--output", tmp_path / "s", *argv], capsys, tmp_path, message)
    assert not (tmp_path / "s").exists() and not (tmp_path.parent / "elsewhere").exists()


def test_sweep_seeds_name_the_runs_inside_the_output(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("arch: efficientnet_b0\nvariants: [baseline]\ndataset: synthetic\nimage_size: 16\n"
                      "seeds: '1,2'\ntag: keras-init\n")
    assert main(["sweep", "--config", str(config), "--output", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "baseline-keras-init-seed1, baseline-keras-init-seed2" in out and not (tmp_path / "s").exists()


def test_every_saved_config_field_has_a_checked_type():
    """check_fields knows each field's type: a field added later is checked too, not let through."""
    from dataclasses import fields

    from gpconv.experiments.config import ModelConfig, TrainConfig, _type_check

    for kind in (ModelConfig, TrainConfig):
        unknown = [item.name for item in fields(kind) if _type_check(str(item.type))[1] == "anything"]
        assert not unknown, f"{kind.__name__} fields without a type check: {unknown}"


def test_concurrent_sweeps_of_one_folder_keep_each_others_runs(tmp_path, monkeypatch):
    """A sweep merges its runs into the sweep.json it finds when it writes, not the one it read when it
    started: runs another sweep of the folder added meanwhile stay, in their order."""
    import gpconv.experiments.data as data

    output = tmp_path / "s"
    sweep = ["sweep", *[a for a in TINY if a not in ("--synthetic-size", "60,20", "--no-augment")],
             "--output", str(output)]
    assert main([*sweep, "--variants", "baseline"]) == 0
    real_load = data.load_dataset

    def load_while_another_sweep_writes(*args, **kwargs):  # between this sweep's start and its write
        plan = json.loads((output / "sweep.json").read_text())
        plan["runs"].append({**plan["runs"][0], "name": "added-meanwhile"})
        (output / "sweep.json").write_text(json.dumps(plan))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data, "load_dataset", load_while_another_sweep_writes)
    assert main([*sweep, "--variants", "v2", "--channels-per-group", "16"]) == 0
    names = [run["name"] for run in json.loads((output / "sweep.json").read_text())["runs"]]
    assert names == ["baseline", "added-meanwhile", "v2-16ch"]
    monkeypatch.setattr(data, "load_dataset", real_load)
    assert main([*sweep, "--variants", "baseline"]) == 0  # finished: skipped, and keeps its place
    assert [run["name"] for run in json.loads((output / "sweep.json").read_text())["runs"]] == names


def test_a_run_folder_another_process_is_training_is_refused_and_a_sweep_skips_it(tmp_path, capsys):
    """While one process trains a run folder (it holds the folder's lock file), train --resume there is one
    line and leaves the other process's files (its temporaries included) alone; a sweep skips that run
    and trains the others."""
    import fcntl

    from gpconv.experiments.run_folder import RUN_LOCK

    output = tmp_path / "s"
    folder = output / "baseline"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    temporary = folder / ".last.pt.abcd1234.tmp"  # the other process's checkpoint, being written
    temporary.write_bytes(b"half")
    other_entry = {"name": "baseline", "arch": "efficientnet_b0", "variant": "baseline", "options": {"epochs": 7}}
    (output / "sweep.json").write_text(json.dumps({"runs": [other_entry]}))  # the other sweep's plan
    with open(folder / RUN_LOCK, "a") as held:  # the other process: an OS lock on the file, as filelock takes
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(folder)
        refused(["train", *TINY, "--output", folder, "--resume"], capsys, tmp_path, "being trained by another")
        assert snapshot(folder) == before
        sweep = [a for a in TINY if a not in ("--synthetic-size", "60,20", "--no-augment")]
        assert main(["sweep", *sweep, "--variants", "baseline,v2", "--channels-per-group", "16",
                     "--output", str(output)]) == 0
        out = capsys.readouterr().out
        assert "baseline: skipped" in out and "being trained by another" in out, out
        plan = {run["name"]: run for run in json.loads((output / "sweep.json").read_text())["runs"]}
        assert plan["baseline"]["options"]["epochs"] == 7  # the busy run's entry keeps the other sweep's settings
        assert (output / ".sweep.json.lock").stat().st_mode & 0o777 == 0o666  # other users can lock it too
        assert (output / "v2-16ch" / "metrics.json").exists() and not (folder / "metrics.json").exists()
        assert temporary.read_bytes() == b"half"
    assert main(["train", *TINY, "--output", str(folder), "--resume"]) == 0  # released: it runs


def test_two_threads_of_one_process_cannot_hold_one_run_folder(tmp_path):
    """The run folder lock is reentrant for the thread that holds it (shrink, then its train) only."""
    import threading

    from gpconv.experiments.run_folder import run_folder_lock
    from gpconv.io import FolderBusy

    errors, held, done = [], threading.Event(), threading.Event()

    def first():
        with run_folder_lock(tmp_path / "run"):
            with run_folder_lock(tmp_path / "run"):  # the same thread again: a no-op
                held.set()
                done.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(10)
    try:
        with run_folder_lock(tmp_path / "run"):
            pass
    except FolderBusy as error:
        errors.append(str(error))
    finally:
        done.set()
        thread.join()
    assert errors and "being trained by another" in errors[0]
    assert not (tmp_path / "run" / ".gpconv.lock").exists()  # released and removed
