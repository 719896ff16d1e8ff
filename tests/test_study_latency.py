"""Latency beside accuracy (issue 25): benchmarks/study_latency.py writes one row per variant of a
study; gpconv report --latency puts its columns into the runs' CSV and plots accuracy against
milliseconds. Tiny settings: no timing is asserted (timing lives in benchmarks/)."""

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from gpconv.cli import main
from gpconv.experiments.results import LATENCY_FIELDS, read_latency_table

SCRIPT = ROOT / "benchmarks" / "study_latency.py"
MODELS = {"baseline": dict(arch="efficientnet_b0", image_size=16),
          "v2-16ch": dict(arch="efficientnet_b0", image_size=16, channels_per_group=16),
          "baseline-w0.5": dict(arch="efficientnet_b0", image_size=16, width=0.5)}


def _run(folder, model, seed, accuracy):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"trainable_params": 1000, "computations": 5000,
                                                     "test_accuracy": accuracy, "epochs": 1, "dataset": "cifar10"}))
    (folder / "config.json").write_text(json.dumps({"model": model, "train": {"seed": seed}}))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two seeds of three variants (fake finished runs with real model configs) and their latency CSV."""
    root = tmp_path_factory.mktemp("study")
    for seed in (0, 1):
        for index, (variant, model) in enumerate(MODELS.items()):
            _run(root / "runs" / f"{variant}-seed{seed}", model, seed, 0.4 + 0.05 * index + 0.01 * seed)
    result = subprocess.run([sys.executable, str(SCRIPT), str(root / "runs"), "--output", str(root / "latency.csv"),
                             "--runtimes", "torch eager,prepare_for_inference", "--batch", "2", "--deploy-size", "32",
                             "--rounds", "1", "--iterations", "1", "--threads", "1"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_one_row_per_variant_with_its_fastest_runtime_in_both_settings(study):
    rows = list(csv.DictReader((study / "latency.csv").open()))
    assert sorted(row["variant"] for row in rows) == sorted(MODELS)  # one row each (folder order: by name)
    for row in rows:
        for setting, runtime, latency in (("b64", "runtime", "latency_ms_b64"), ("b1", "runtime_b1", "latency_ms_b1")):
            measured = {name: float(row[f"{name} {setting} ms"]) for name in ("torch eager", "prepare_for_inference")}
            assert row[runtime] == min(measured, key=measured.get)
            assert float(row[latency]) == min(measured.values()) > 0
    assert set(read_latency_table(study / "latency.csv")) == set(MODELS)


def test_report_writes_the_latency_columns_and_the_accuracy_vs_latency_plots(study):
    output, table = study / "report", study / "study.csv"
    assert main(["report", str(study / "runs"), "--output", str(output), "--runs-csv", str(table),
                 "--latency", str(study / "latency.csv")]) == 0
    latency = read_latency_table(study / "latency.csv")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 6
    for row in rows:
        assert float(row["latency_ms_b64"]) == latency[row["variant"]]["latency_ms_b64"]
        assert float(row["latency_ms_b1"]) == latency[row["variant"]]["latency_ms_b1"]
        assert row["runtime"] == latency[row["variant"]]["runtime"]
        assert row["width"] == ("0.5" if row["variant"] == "baseline-w0.5" else "1")
    for name in ("accuracy_vs_latency.png", "accuracy_vs_latency_b1.png", "accuracy_vs_parameters.png"):
        assert (output / name).stat().st_size > 1000
    markdown = (output / "results.md").read_text()
    assert "## Accuracy against latency" in markdown
    section = markdown[markdown.index("## Accuracy against latency"):]
    line = next(line for line in section.splitlines() if line.startswith("| baseline-w0.5 |"))
    assert f"{latency['baseline-w0.5']['latency_ms_b64']:.2f}" in line and "| 0.5 |" in line


def test_report_without_latency_leaves_the_columns_empty(study):
    table = study / "plain.csv"
    assert main(["report", str(study / "runs"), "--output", str(study / "plain"), "--runs-csv", str(table)]) == 0
    row = next(csv.DictReader(table.open()))
    assert row["latency_ms_b64"] == row["runtime"] == "" and row["width"] == "1"
    assert not (study / "plain" / "accuracy_vs_latency.png").exists()


@pytest.mark.parametrize("content, message", [
    ("variant,runtime,latency_ms_b64\nbaseline,torch eager,1\n", "has no column 'runtime_b1'"),
    ("variant,runtime,latency_ms_b64,runtime_b1,latency_ms_b1\nbaseline,a,0,a,1\n", "line 2: latency_ms_b64 is '0'"),
    ("variant,runtime,latency_ms_b64,runtime_b1,latency_ms_b1\nbaseline,a,x,a,1\n", "latency_ms_b64 is 'x'"),
    (",".join(LATENCY_FIELDS) + "\nbaseline,a,1,a,1\n", "has no row for variant 'baseline-w0.5'"),
])
def test_a_bad_latency_table_is_refused_in_one_line_and_writes_nothing(study, tmp_path, capsys, content, message):
    bad = tmp_path / "latency.csv"
    bad.write_text(content)
    assert main(["report", str(study / "runs"), "--output", str(tmp_path / "out"), "--latency", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "results.md").exists()


def test_the_script_refuses_bad_input_in_one_line(tmp_path):
    (tmp_path / "taken.csv").write_text("someone's file\n")
    for argv, message in (([str(tmp_path / "nothing")], "is not a folder"),
                          (["--models", "mobilenet:baseline", "--image-size", "16", "--skip-strides", "0"],
                           "too small for mobilenet")):
        result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--output", str(tmp_path / "taken.csv")],
                                capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert (tmp_path / "taken.csv").read_text() == "someone's file\n"
    result = subprocess.run([sys.executable, str(SCRIPT), "--models", "mobilenet:baseline", "--output",
                             str(tmp_path / "taken.csv")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "already holds taken.csv" in result.stderr and "Traceback" not in result.stderr


def test_percent_columns_divide_by_each_familys_baseline(tmp_path):
    """A sweep of several architectures names its runs ARCH-VARIANT: each k-model's % is of its own baseline."""
    for name, params in (("mobilenet-baseline", 1000), ("mobilenet-v2-16ch", 250), ("mobilenet_v3_large-baseline", 400),
                         ("mobilenet_v3_large-v2-16ch", 200)):
        _run(tmp_path / "runs" / name, {"arch": name.split("-")[0]}, 0, 0.5)
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps({**metrics, "trainable_params": params}))
    assert main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    rows = {row["model"]: row["% parameters"] for row in csv.DictReader((tmp_path / "report" / "results.csv").open())}
    assert rows == {"mobilenet-baseline": "100.0", "mobilenet-v2-16ch": "25.0", "mobilenet_v3_large-baseline": "100.0",
                    "mobilenet_v3_large-v2-16ch": "50.0"}
