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


def test_summary_compare_prints_layers_and_totals(capsys):
    from conftest import paper_rows
    import time
    started = time.perf_counter()
    assert main(["summary", "efficientnet_b0", "--channels-per-group", "16", "--compare"]) == 0
    assert time.perf_counter() - started < 10
    out = capsys.readouterr().out
    assert "features.20 " in out and "320  1280" in out  # the top 1x1 convolution, 320 -> 1280
    baseline = next((row for row in paper_rows("efficientnet_b0")
                    if row["variant"] == "baseline" and row["input_size"] == 224), None)
    if baseline:
        assert f"{baseline['trainable_params']:,}" in out and f"{baseline['computations']:,}" in out
    assert "\nv2-16ch " in out and "\nbaseline " in out


def test_summary_of_a_zoo_variant(capsys):
    from conftest import paper_rows
    assert main(["summary", "densenet_bc_100", "--channels-per-group", "32", "--version", "1", "--no-l-layer",
                 "--activation", "relu"]) == 0
    out = capsys.readouterr().out
    assert "densenet_bc_100 v1-32ch-noL, 10 classes, 32x32 input" in out
    for row in paper_rows("densenet_bc_100"):  # JP33B15 kType 23, ReLU
        if row["variant"] == "v1-32ch-noL":
            assert f"{row['trainable_params']:,}" in out and f"{row['computations']:,}" in out


def test_summary_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:  # checked by the option's type, as gpconv train checks it
        main(["summary", "mobilenet", "--channels-per-group", "0"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith("gpconv: error: argument --channels-per-group: expected an integer >= 1")
