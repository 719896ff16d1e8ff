"""The core (plan, block, models, counting, convert, inference, export's entry point) and the core
commands of the CLI work with torch alone; the commands that need the ``train`` extra say so in one line.

Each case runs in a subprocess with site-packages off (``python -S``) and on its path only the
repository and links to torch and the distributions torch requires: an environment with torch alone
(no numpy either: torch does not require it), made in a second from the installed packages."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path, PurePath

import pytest

from conftest import ROOT

EXTRAS_MODULES = ("numpy", "matplotlib", "yaml", "PIL", "tqdm", "onnx", "onnxruntime", "onnxscript", "openvino",
                  "transformers")

SCRIPT = f"""
import importlib.util
assert not [name for name in {EXTRAS_MODULES!r} if importlib.util.find_spec(name)], "not torch alone"
import torch, gpconv
model = gpconv.create_model("efficientnet_b0", 10, channels_per_group=16, skip_strides=3)
assert gpconv.count_parameters(model) == 623226
fast = gpconv.prepare_for_inference(model, example_input=torch.rand(2, 3, 32, 32))
print(gpconv.summarize(model).rows[0].name)
print("ok")
"""

CLI = """
import runpy, sys
sys.argv = ["gpconv"] + sys.argv[1:]
runpy.run_module("gpconv.cli", run_name="__main__")
"""


def _link_torch_alone(folder: Path) -> Path:
    """Fill ``folder`` with links to the top-level modules (and metadata) of torch and of the
    distributions it requires outside extras, recursively."""
    seen, todo = set(), ["torch"]
    while todo:
        try:
            dist = metadata.distribution(todo.pop())
        except metadata.PackageNotFoundError:  # a requirement for another platform
            continue
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo += [re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0] for requirement in dist.requires or ()
                 if "extra ==" not in requirement]
        for top in {PurePath(file).parts[0] for file in dist.files or ()} - {"..", "__pycache__"}:
            if not (folder / top).exists():
                (folder / top).symlink_to(dist.locate_file(top))
    return folder


@pytest.fixture(scope="module")
def torch_alone(tmp_path_factory) -> Path:
    return _link_torch_alone(tmp_path_factory.mktemp("torch_alone"))


def _run(torch_alone: Path, code: str, *argv: str) -> subprocess.CompletedProcess:
    path = f"import sys\nsys.path[:0] = [{str(torch_alone)!r}, {str(ROOT)!r}]\n"
    # torch itself warns once that it runs without numpy: not gpconv's output
    return subprocess.run([sys.executable, "-S", "-W", "ignore:Failed to initialize NumPy", "-c", path + code, *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_import_gpconv_needs_only_torch(torch_alone):
    result = _run(torch_alone, SCRIPT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_core_commands_need_only_torch(torch_alone):
    result = _run(torch_alone, CLI, "table", "--variants", "baseline,v2-16ch", "--input-size", "32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "623,226  ok" in result.stdout  # kEffNet-B0 V2 16ch at 32x32, matching the paper
    result = _run(torch_alone, CLI, "plan", "14", "10", "--channels-per-group", "4")
    assert result.returncode == 0 and "K2: 2 groups" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("argv", [
    ["train", "--arch", "efficientnet_b0", "--dataset", "synthetic", "--output", "{tmp}/run"],
    ["report", "{tmp}", "--output", "{tmp}/report"],
    ["demo", "--output", "{tmp}/run"],
], ids=lambda argv: argv[0])
def test_train_extra_commands_say_what_to_install(argv, tmp_path, torch_alone):
    result = _run(torch_alone, CLI, *[arg.format(tmp=tmp_path) for arg in argv])
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
