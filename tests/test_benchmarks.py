"""The benchmark scripts (not tests themselves) import and parse their options."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


SCRIPTS = ["benchmark.py", "block_times.py", "training_profile.py", "training_health.py", "omp_wait_policy.py",
           "convert_models.py", "runtimes.py", "study_latency.py", "ort_profile.py", "exporter_compare.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_dataset_memory_benchmark_starts():
    test_benchmark_script_starts("dataset_memory.py")


GPU_CHECK = BENCHMARKS / "gpu_check.sh"
# what a device call brings back: at most 8 files, named in letters, digits, '.', '_' and '-'
GPU_CHECK_FILES = {"environment.txt", "tests.log", "benchmark.log", "benchmark.json", "train.log", "train_history.csv",
                   "train_metrics.json", "summary.txt"}


def run_gpu_check(*args, **env):
    import os

    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(GPU_CHECK), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=environment)


def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh OUTDIR --dry-run: the CUDA tests (skipped on the CPU), benchmark.py and a real-data
    training with tiny settings, every file in OUTDIR, within the device's limits."""
    import json
    import re

    out = tmp_path / "out"
    result = run_gpu_check(out, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in out.iterdir()} == GPU_CHECK_FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in GPU_CHECK_FILES) and len(GPU_CHECK_FILES) <= 8
    summary = (out / "summary.txt").read_text()
    assert [line.split()[:2] for line in summary.splitlines()[:3]] == [["tests", "ok"], ["benchmark", "ok"],
                                                                       ["train", "ok"]]
    limits = [int(limit) for limit in re.findall(r"\(limit (\d+)s", summary)]
    budget = int(re.search(r"of a (\d+)s budget", summary).group(1))
    assert budget <= 8 * 60 and sum(limits) < budget  # the steps' limits fit the check's 8 minutes
    skipped = re.findall(r"SKIPPED \[(\d+)\] \S*test_cuda.py:\d+: needs a CUDA GPU", (out / "tests.log").read_text())
    assert sum(map(int, skipped)) >= 5  # the CUDA tests were collected and, without a GPU, skipped
    figures = json.loads((out / "benchmark.json").read_text())
    assert "AVX" in figures["machine"] or "features unknown" in figures["machine"]
    for key in ("inference 32x32 batch 2 skip 3 (ms)", "training images/s"):
        assert set(figures[key]) == {"EfficientNet-B0", "kEffNet-B0 V2 16ch", "kEffNet-B0 V2 32ch"}
        assert all(value > 0 for value in figures[key].values())
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (out / "train_history.csv").read_text().startswith("epoch,")


def test_gpu_check_refuses_a_folder_with_files_and_bad_options(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    result = run_gpu_check(tmp_path, "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"] and (tmp_path / "kept.txt").read_text() == "mine"
    for args in ([], [tmp_path / "new", "--fast"], ["--dry-run"]):
        result = run_gpu_check(*args)
        assert result.returncode == 2 and result.stderr.startswith("gpu_check: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_gpu_check_without_a_gpu_says_so_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    result = run_gpu_check(tmp_path / "out")
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr and result.stderr.count("\n") == 1
