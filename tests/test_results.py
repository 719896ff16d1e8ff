"""Issue 6: class activation maps, sweeps, reports and the per-table configs."""

import csv
import json

import pytest
import torch

from conftest import ROOT, SHARED, gpconv_cli
from gpconv.experiments.cam import cam, cam_linear
from gpconv.cli import main
from gpconv.experiments.data import PAPER_DATASETS
from gpconv.models import create_model, list_models
from gpconv.experiments.paper_numbers import parse_variant
from gpconv.experiments.results import collect_runs, format_results_table, pareto_front
from gpconv.experiments.sweep import expand_runs, expand_variants, load_sweep_config

CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"


def gpconv(*argv, process=False):
    return gpconv_cli(*argv, process=process)


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- CAM


@pytest.fixture(scope="module")
def tiny_untrained():
    torch.manual_seed(0)
    # 32x32 input, skip_strides=2: the last feature maps are 4x4, so the map has spatial structure
    return create_model("efficientnet_b0", 10, channels_per_group=16, skip_strides=2).eval()


def test_cam_has_the_image_shape_is_normalised_and_depends_on_the_class(tiny_untrained):
    torch.manual_seed(1)
    image = torch.rand(3, 32, 32)
    map_a, predicted, probabilities = cam(tiny_untrained, image, class_index=0)
    map_b, _, _ = cam(tiny_untrained, image, class_index=1)
    assert map_a.shape == (32, 32) and map_b.shape == (32, 32)
    assert float(map_a.min()) == pytest.approx(0.0) and float(map_a.max()) == pytest.approx(1.0)
    assert not torch.allclose(map_a, map_b)
    assert probabilities.shape == (10,) and 0 <= predicted < 10
    default, predicted_again, _ = cam(tiny_untrained, image)
    assert predicted_again == predicted and torch.allclose(default, cam(tiny_untrained, image, predicted)[0])


def test_cam_is_the_class_weighted_sum_of_the_last_feature_maps(tiny_untrained):
    image = torch.rand(3, 32, 32)
    linear = cam_linear(tiny_untrained)
    assert linear is tiny_untrained.classifier[-1]
    with torch.no_grad():
        maps = tiny_untrained.features(image[None])[0]
    raw = torch.einsum("c,chw->hw", linear.weight[3], maps)
    expected = torch.nn.functional.interpolate(raw[None, None], size=(32, 32), mode="bilinear",
                                               align_corners=False)[0, 0]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(cam(tiny_untrained, image, 3)[0], expected, atol=1e-5)


def test_cam_rejects_a_bad_class_and_a_model_with_a_head(tiny_untrained):
    with pytest.raises(ValueError, match="out of range"):
        cam(tiny_untrained, torch.rand(3, 32, 32), class_index=10)
    with torch.device("meta"):
        v3 = create_model("mobilenet_v3_large", 10)
    with pytest.raises(ValueError, match="CAM needs"):
        cam_linear(v3)
    with pytest.raises(ValueError, match="CAM needs"):
        cam_linear(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(1)))


# ---------------------------------------------------------------------------------------------- sweep config


def test_variant_templates_expand_over_channels_per_group():
    assert expand_variants(["baseline", "v2", "v2-noL", "v2-16ch-relu"], [4, 16]) == [
        "baseline", "v2-4ch", "v2-16ch", "v2-4ch-noL", "v2-16ch-noL", "v2-16ch-relu"]
    with pytest.raises(ValueError, match="unknown variant"):
        expand_variants(["v3-16ch"], [])
    with pytest.raises(ValueError, match="needs channels_per_group"):
        expand_variants(["v2"], [])


def test_run_names_carry_what_varies_and_overrides_apply():
    config = {"dataset": "cifar10", "epochs": 50, "groups": [
        {"arch": "efficientnet_b0", "image_size": 224, "variants": ["baseline"]},
        {"arch": "efficientnet_b0", "image_size": 32, "skip_strides": 3, "variants": ["v2-16ch"]},
        {"arch": "mobilenet", "image_size": 224, "variants": ["v1-32ch"]}]}
    runs = expand_runs(config, {"epochs": 2, "max_train_batches": 5, "data_dir": None})
    assert [run.name for run in runs] == ["efficientnet_b0-224px-baseline", "efficientnet_b0-32px-v2-16ch",
                                          "mobilenet-224px-v1-32ch"]
    assert {run.options["epochs"] for run in runs} == {2} and runs[1].options["skip_strides"] == 3
    assert runs[1].model_config().channels_per_group == 16
    with pytest.raises(ValueError, match="unknown arch"):
        expand_runs({"arch": "resnet", "dataset": "cifar10", "variants": ["baseline"]})
    with pytest.raises(ValueError, match="unknown key"):
        expand_runs({"arch": "mobilenet", "dataset": "cifar10", "variants": ["baseline"], "epoch": 3})


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_is_one_config_per_paper_table():
    names = {path.stem for path in CONFIGS}
    assert {f"mendel_table{n}" for n in (1, 2, 3, 4)} | {f"entropy_table{n}" for n in (2, 4, 5, 6, 7, 8)} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_parses_into_valid_runs(path):
    config = load_sweep_config(path)
    runs = expand_runs(config, {"epochs": 2, "max_train_batches": 5})
    assert runs and len({run.name for run in runs}) == len(runs)
    for run in runs:
        assert run.arch in list_models()
        parse_variant(run.variant)
        assert run.options["epochs"] == 2 and run.options["max_train_batches"] == 5
        assert run.options["dataset"] in ("cifar10", "cifar100", *PAPER_DATASETS)
    assert any(run.variant == "baseline" for run in runs)
    for key in {(run.arch, run.variant, run.options["skip_strides"]) for run in runs}:
        run = next(r for r in runs if (r.arch, r.variant, r.options["skip_strides"]) == key)
        with torch.device("meta"):  # shapes only: checks the arch/variant/skip_strides combination quickly
            run.model_config().build()


def test_config_epochs_follow_the_papers():
    epochs = {path.stem: load_sweep_config(path)["epochs"] for path in CONFIGS}
    assert epochs["mendel_table1"] == 50 and epochs["mendel_table3"] == 75 and epochs["mendel_table4"] == 150
    assert epochs["entropy_table4"] == 50 and epochs["entropy_table6"] == 180
    assert epochs["entropy_table7"] == 75 and epochs["entropy_table8"] == 1000


def test_pareto_front():
    # costs, accuracies: run 2 is beaten by run 1 (cheaper and better), run 3 is the most accurate
    assert pareto_front([1, 2, 3, 4], [0.5, 0.7, 0.6, 0.9]) == [0, 1, 3]


# ---------------------------------------------------------------------------------------------- sweep + report


TINY_SWEEP = ["sweep", "--arch", "efficientnet_b0", "--variants", "baseline,v2", "--channels-per-group", "16",
              "--dataset", "synthetic", "--image-size", "16", "--batch-size", "8", "--max-train-batches", "2",
              "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    output = tmp_path_factory.mktemp("sweep") / "sweep"
    assert main([*TINY_SWEEP, "--epochs", "1", "--output", str(output)]) == 0
    return output


def test_sweep_writes_one_finished_run_folder_per_variant(tiny_sweep):
    assert sorted(p.name for p in tiny_sweep.iterdir() if p.is_dir()) == ["baseline", "v2-16ch"]
    for name in ("baseline", "v2-16ch"):
        folder = tiny_sweep / name
        assert {"metrics.json", "tta.json", "best.pt", "last.pt", "history.csv"} <= {p.name for p in folder.iterdir()}
        tta = json.loads((folder / "tta.json").read_text())
        assert 0 <= tta["test_accuracy"] <= 1 and 0 <= tta["test_accuracy_hflip_tta"] <= 1
    config = json.loads((tiny_sweep / "v2-16ch" / "config.json").read_text())
    assert config["model"]["channels_per_group"] == 16 and config["train"]["max_train_batches"] == 2


def test_sweep_skips_finished_runs_and_resumes_interrupted_ones(tiny_sweep, capsys):
    finished = tiny_sweep / "baseline" / "metrics.json"
    before = finished.stat().st_mtime_ns
    interrupted = tiny_sweep / "v2-16ch"
    (interrupted / "metrics.json").unlink()  # as if killed after its first epoch's checkpoint
    (interrupted / "tta.json").unlink()
    assert main([*TINY_SWEEP, "--epochs", "2", "--output", str(tiny_sweep)]) == 0
    out = capsys.readouterr().out
    assert "baseline: finished before" in out and finished.stat().st_mtime_ns == before
    assert "resuming" in out
    assert json.loads((interrupted / "metrics.json").read_text())["epochs"] == 2  # epoch 1 reused, epoch 2 trained


def test_report_table_columns_come_from_metrics_json(tiny_sweep, tmp_path):
    output = tmp_path / "report"
    assert main(["report", str(tiny_sweep / "baseline"), str(tiny_sweep / "v2-16ch"), "--output", str(output)]) == 0
    for name in ("results.md", "results.csv", "accuracy_vs_parameters.png", "accuracy_vs_computations.png",
                 "training_curves.png"):
        assert (output / name).stat().st_size > 0, name
    assert not list(output.glob("*.tmp"))
    rows = list(csv.DictReader((output / "results.csv").open()))
    assert [row["model"] for row in rows] == ["baseline", "v2-16ch"]
    for row in rows:
        metrics = json.loads((tiny_sweep / row["model"] / "metrics.json").read_text())
        tta = json.loads((tiny_sweep / row["model"] / "tta.json").read_text())
        assert int(row["parameters"]) == metrics["trainable_params"]
        assert int(row["computations"]) == metrics["computations"]
        assert float(row["test accuracy"]) == pytest.approx(tta["test_accuracy"], abs=1e-4)
        assert float(row["test accuracy (H-flip TTA)"]) == pytest.approx(tta["test_accuracy_hflip_tta"], abs=1e-4)
    assert rows[0]["% parameters"] == "100.0"
    base = json.loads((tiny_sweep / "baseline" / "metrics.json").read_text())["trainable_params"]
    k = json.loads((tiny_sweep / "v2-16ch" / "metrics.json").read_text())["trainable_params"]
    assert float(rows[1]["% parameters"]) == pytest.approx(100 * k / base, abs=0.05)
    assert f"{k:,}" in (output / "results.md").read_text()
    # a sweep folder stands for its runs, in the sweep's order
    assert [run.name for run in collect_runs([tiny_sweep])] == ["baseline", "v2-16ch"]


def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(gpconv("report", str(tmp_path), "--output", str(tmp_path / "r"), process=True),
                          "holds no finished run")  # as a shell sees it; the others in this process
    assert_one_line_error(gpconv("sweep", "--arch", "efficientnet_b0", "--variants", "baseline,v9-3ch", "--dataset",
                                 "synthetic", "--output", str(tmp_path / "s")), "unknown variant")
    assert_one_line_error(gpconv("sweep", "--config", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "s")),
                          "does not exist")
    assert_one_line_error(gpconv("cam", "--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "c")),
                          "does not exist")


@pytest.mark.skipif(not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir(), reason="CIFAR-10 subset is not present")
def test_cam_command_on_a_checkpoint_trained_on_real_data(tmp_path):
    run = tmp_path / "run"
    result = gpconv("train", "--arch", "efficientnet_b0", "--dataset", "cifar10", "--data-dir", str(CIFAR_SUBSET),
                    "--epochs", "1", "--max-train-batches", "2", "--skip-strides", "0", "--threads", "1",
                    "--output", str(run))
    assert result.returncode == 0, result.stderr
    output = tmp_path / "cam"
    result = gpconv("cam", "--checkpoint", str(run / "best.pt"), "--compare", str(run / "last.pt"), "--images", "3",
                    "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == ["cam_000.png", "cam_001.png", "cam_002.png", "cam_grid.png"]
    from PIL import Image

    with Image.open(output / "cam_grid.png") as grid, Image.open(output / "cam_000.png") as single:
        assert grid.size[1] > single.size[1]  # three rows of panels
        assert grid.size[0] >= single.size[0] * 0.9


def _fake_run(folder, params, computations, accuracy, hflip_tta=False, tta=None):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "trainable_params": params, "computations": computations, "test_accuracy": accuracy,
        "hflip_tta": hflip_tta, "epochs": 1, "dataset": "cifar10"}))
    (folder / "history.csv").write_text("epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy,seconds\n"
                                        "1,0.001,2.0,0.3,2.1,0.25,1.0\n")
    if tta is not None:
        (folder / "tta.json").write_text(json.dumps({"test_accuracy": accuracy, "test_accuracy_hflip_tta": tta}))


def test_report_reads_runs_of_gpconv_train_with_and_without_tta(tmp_path):
    _fake_run(tmp_path / "a" / "baseline", 1000, 5000, 0.5)  # gpconv train, no TTA
    _fake_run(tmp_path / "b" / "v2-16ch", 200, 2000, 0.6, hflip_tta=True)  # gpconv train --hflip-tta
    _fake_run(tmp_path / "c" / "v2-4ch", 100, 1000, 0.4, tta=0.45)  # gpconv sweep
    output = tmp_path / "report"
    runs = [str(tmp_path / p) for p in ("a/baseline", "b/v2-16ch", "c/v2-4ch")]
    assert main(["report", *runs, "--output", str(output)]) == 0
    rows = {row["model"]: row for row in csv.DictReader((output / "results.csv").open())}
    assert (rows["baseline"]["test accuracy"], rows["baseline"]["test accuracy (H-flip TTA)"]) == ("0.5000", "-")
    assert (rows["v2-16ch"]["test accuracy"], rows["v2-16ch"]["test accuracy (H-flip TTA)"]) == ("-", "0.6000")
    assert rows["v2-4ch"]["test accuracy (H-flip TTA)"] == "0.4500"
    assert rows["v2-4ch"]["% parameters"] == "10.0" and rows["v2-16ch"]["% computations"] == "40.0"
    assert main(["report", *runs, "--output", str(output), "--baseline", "nope"]) == 2


def test_sweep_passes_precise_bn_batches_to_training(tmp_path):
    config = {"arch": "efficientnet_b0", "dataset": "synthetic", "variants": ["baseline"]}
    default, = expand_runs(config)
    assert default.train_config(tmp_path).precise_bn_batches == 0
    run, = expand_runs(config, {"precise_bn_batches": 4})
    assert run.train_config(tmp_path).precise_bn_batches == 4


def test_seeds_and_tags_name_the_runs_and_reach_training(tmp_path):
    config = {"arch": "efficientnet_b0", "dataset": "synthetic", "lr_cycle": 12, "classifier_init": "torch",
              "groups": [{"variants": ["baseline", "v2-16ch"], "seeds": [0, 1]},
                         {"variants": ["baseline"], "tag": "keras-init", "classifier_init": "family"}]}
    runs = expand_runs(config)
    assert [run.name for run in runs] == ["baseline-seed0", "v2-16ch-seed0", "baseline-seed1", "v2-16ch-seed1",
                                          "baseline-keras-init-seed0"]
    assert [run.train_config(tmp_path).seed for run in runs] == [0, 0, 1, 1, 0]
    assert {run.train_config(tmp_path).lr_cycle for run in runs} == {12}
    assert [run.model_config().classifier_init for run in runs] == ["torch"] * 4 + ["family"]
    with pytest.raises(ValueError, match="classifier_init"):
        expand_runs({**config, "classifier_init": "xavier"})


def test_report_summarises_seeds_and_writes_one_csv_row_per_run(tmp_path):
    for name, seed, accuracy in (("baseline-seed0", 0, 0.5), ("baseline-seed1", 1, 0.6), ("v2-16ch-seed0", 0, 0.55)):
        params = 1000 if name.startswith("baseline") else 150
        _fake_run(tmp_path / "sweep" / name, params, 10 * params, accuracy, tta=accuracy + 0.01)
        (tmp_path / "sweep" / name / "config.json").write_text(json.dumps({"train": {"seed": seed}}))
    output, table = tmp_path / "report", tmp_path / "study.csv"
    assert main(["report", str(tmp_path / "sweep"), "--output", str(output), "--runs-csv", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert [(row["variant"], row["seed"], row["trainable_params"]) for row in rows] == [
        ("baseline", "0", "1000"), ("baseline", "1", "1000"), ("v2-16ch", "0", "150")]
    assert float(rows[1]["test_accuracy_hflip"]) == pytest.approx(0.61)
    assert float(rows[0]["train_seconds"]) == 1.0  # the epochs' times in history.csv (right for resumed runs too)
    assert list(rows[0]) == ["variant", "seed", "width", "trainable_params", "computations", "test_accuracy",
                             "test_accuracy_hflip", "epochs", "train_seconds", "latency_ms_b64", "latency_ms_b1",
                             "runtime", "runtime_b1"]
    markdown = (output / "results.md").read_text()
    assert "| baseline | 2 | 1,000 | 100.0% |" in markdown and "0.5500 ± 0.0707" in markdown
    assert "| v2-16ch | 1 | 150 | 15.0% |" in markdown


def test_a_report_can_replace_its_own_earlier_report(tmp_path):
    _fake_run(tmp_path / "sweep" / "baseline", 1000, 5000, 0.5, tta=0.5)
    output = tmp_path / "report"
    assert main(["report", str(tmp_path / "sweep"), "--output", str(output)]) == 0
    assert main(["report", str(tmp_path / "sweep"), "--output", str(output)]) == 2  # refused without --overwrite
    assert main(["report", str(tmp_path / "sweep"), "--output", str(output), "--overwrite"]) == 0
    assert main(["report", str(tmp_path / "sweep"), "--output", str(tmp_path / "sweep" / "baseline"),
                 "--overwrite"]) == 2  # a run folder stays refused


# ---------------------------------------------------------------------------------------------- tables


def test_render_table_plain_and_markdown():
    from gpconv.io import render_table

    header, rows = ("model", "parameters", ""), [("baseline", "4,020,358", "-"), ("v2-16ch", "623,226", "ok")]
    assert render_table(header, rows).splitlines() == [
        "model     parameters",  # trailing spaces of the empty last header cell removed
        "------------------------",  # the rule spans the widest line
        "baseline   4,020,358   -",
        "v2-16ch      623,226  ok"]
    assert render_table(header, rows, rule=False, align="lll").splitlines()[1] == "baseline  4,020,358   -"
    assert render_table(header, rows, markdown=True).splitlines() == [
        "| model | parameters |  |", "|---|---:|---:|", "| baseline | 4,020,358 | - |", "| v2-16ch | 623,226 | ok |"]
    with pytest.raises(ValueError, match="3 headers"):
        render_table(header, [("baseline", "4,020,358")])


def test_report_tables_are_markdown_with_numbers_right_aligned(tmp_path):
    _fake_run(tmp_path / "sweep" / "baseline", 1000, 5000, 0.5, tta=0.52)
    _fake_run(tmp_path / "sweep" / "v2-16ch", 150, 900, 0.45, tta=0.47)
    lines = format_results_table(collect_runs([tmp_path / "sweep"])).splitlines()
    assert lines[0] == ("| model | parameters | % parameters | computations | % computations | test accuracy "
                        "| test accuracy (H-flip TTA) | epochs |")
    assert lines[1] == "|---|" + "---:|" * 7
    assert lines[3].startswith("| v2-16ch | 150 | 15.0% | 900 | 18.0% | 0.4500 | 0.4700 |")
