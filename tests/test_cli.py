"""The gpconv command line."""

import subprocess
import sys

import pytest

from gpconv.cli import main


def test_demo_prints_the_table_with_matches(capsys):
    assert main(["demo", "--no-train"]) == 0
    out = capsys.readouterr().out
    for variant in ("baseline", "v1-16ch", "v1-32ch", "v2-2ch", "v2-4ch", "v2-8ch", "v2-16ch", "v2-32ch"):
        assert f"\n{variant} " in out
    assert out.count(" ok") == 14  # 7 k-variants x (parameters, computations)
    assert "623,226" in out and "1152 -> 320 pointwise" in out


def test_plan_command(capsys):
    assert main(["plan", "14", "10", "--channels-per-group", "4"]) == 0
    assert "K2: 2 groups" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["plan", "14", "10", "--channels-per-group", "0"], "channels_per_group must be >= 1"),
    (["table", "--arch", "resnet"], "invalid choice"),
    (["table", "--variants", "baseline,v3-16ch"], "unknown variant 'v3-16ch'"),
])
def test_bad_input_is_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "gpconv.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
