"""The core (plan, block, models, counting, convert, inference, export's entry point) and the core
commands of the CLI work with torch alone; the commands that need the ``train`` extra say so in one line.

Each case runs in a subprocess where the extras' packages (and numpy, which torch does not require)
are made uninstalled: ``sys.modules[name] = None`` makes ``import name`` raise ModuleNotFoundError and
``importlib.util.find_spec(name)`` return None, as in an environment with torch alone."""

import subprocess
import sys

import pytest

from conftest import ROOT

BLOCKED = ("numpy", "matplotlib", "yaml", "PIL", "tqdm", "onnx", "onnxruntime", "onnxscript", "openvino",
           "transformers")

BLOCK = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
"""

SCRIPT = BLOCK + """
import torch, gpconv
model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=16, skip_strides=3)
assert gpconv.count_parameters(model) == 623226
fast = gpconv.prepare_for_inference(model, example_input=torch.rand(2, 3, 32, 32))
print(gpconv.summarize(model).rows[0].name)
print("ok")
"""

CLI = BLOCK + """
import runpy
sys.argv = ["gpconv"] + sys.argv[1:]
runpy.run_module("gpconv.cli", run_name="__main__")
"""


def _run(code: str, *argv: str) -> subprocess.CompletedProcess:
    # torch itself warns once that it runs without numpy: not gpconv's output
    return subprocess.run([sys.executable, "-W", "ignore:Failed to initialize NumPy", "-c", code, *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_import_gpconv_needs_only_torch():
    result = _run(SCRIPT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_core_commands_need_only_torch():
    result = _run(CLI, "table", "--variants", "baseline,v2-16ch", "--input-size", "32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "623,226  ok" in result.stdout  # kEffNet-B0 V2 16ch at 32x32, matching the paper
    result = _run(CLI, "plan", "14", "10", "--channels-per-group", "4")
    assert result.returncode == 0 and "K2: 2 groups" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("argv", [
    ["train", "--arch", "efficientnet_b0", "--dataset", "synthetic", "--output", "{tmp}/run"],
    ["report", "{tmp}", "--output", "{tmp}/report"],
    ["demo", "--output", "{tmp}/run"],
], ids=lambda argv: argv[0])
def test_train_extra_commands_say_what_to_install(argv, tmp_path):
    result = _run(CLI, *[arg.format(tmp=tmp_path) for arg in argv])
    assert result.returncode == 2
    assert result.stderr == f"gpconv: error: gpconv {argv[0]} needs numpy, which is not installed: " \
                            "pip install 'gpconv[train]'\n"
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # refused before any work


def test_a_missing_module_maps_to_its_extra():
    from gpconv.cli import missing_extra_message

    assert missing_extra_message("sweep", "yaml").endswith("pip install 'gpconv[train]'")
    assert missing_extra_message("export", "onnxruntime.quantization") == \
        "gpconv export needs onnxruntime, which is not installed: pip install 'gpconv[deploy]'"
    assert missing_extra_message("train", "torchvision") is None  # not an extra's: the traceback stays
