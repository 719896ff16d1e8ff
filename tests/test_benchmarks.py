"""The benchmark scripts (not tests themselves) import and parse their options."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


SCRIPTS = ["benchmark.py", "block_times.py", "training_profile.py", "training_health.py", "omp_wait_policy.py",
           "convert_models.py", "runtimes.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_dataset_memory_benchmark_starts():
    test_benchmark_script_starts("dataset_memory.py")
