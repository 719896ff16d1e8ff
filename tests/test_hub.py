"""gpconv.hub: a converted model saved as safetensors weights plus its conversion record, and loaded
again (in another process for transformers and timm) with identical outputs; timm-style creation.

Offline: the folders are local (the Hugging Face hub is not reachable where gpconv is developed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpconv
import gpconv.hub as hub
from conftest import ROOT
from test_core_imports import _link_torch_alone, _run

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
tv_models = pytest.importorskip("torchvision.models")
safetensors_torch = pytest.importorskip("safetensors.torch")

CHANNELS_PER_GROUP = 8
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def hf_resnet():
    config = transformers.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[32, 64, 96, 128],
                                       depths=[1, 1, 1, 1])
    return transformers.ResNetForImageClassification(config)


def hf_convnext():
    config = transformers.ConvNextConfig(num_labels=10, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1],
                                         layer_scale_init_value=0.1)
    return transformers.ConvNextForImageClassification(config)


def trained_looking(model):
    """``model`` in eval mode with batch-norm statistics set by a few train-mode batches (not the defaults
    a freshly built model would also have)."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def logits(model, x):
    output = model(pixel_values=x) if isinstance(model, transformers.PreTrainedModel) else model(x)
    return getattr(output, "logits", output)


LOAD_IN_NEW_PROCESS = """
import sys
sys.path.insert(0, {tests!r})
from _torchvision_compat import make_torchvision_importable
make_torchvision_importable()
import torch
from safetensors.torch import load_file, save_file
import gpconv.hub as hub
folder, how = sys.argv[1], sys.argv[2]
model = hub.from_pretrained(folder) if how == "from_pretrained" else hub.create_model("local-dir:" + folder,
                                                                                     pretrained=True)
model.eval()
x = load_file(sys.argv[3])["x"]
with torch.no_grad():
    output = model(pixel_values=x) if hasattr(model, "config") else model(x)
save_file({{"y": getattr(output, "logits", output).contiguous()}}, sys.argv[4])
"""


def outputs_in_new_process(folder: Path, how: str, tmp_path: Path) -> torch.Tensor:
    script = tmp_path / "load.py"
    script.write_text(LOAD_IN_NEW_PROCESS.format(tests=str(ROOT / "tests")))
    safetensors_torch.save_file({"x": X}, tmp_path / "x.safetensors")
    # the same number of CPU threads as this process (earlier in-process CLI calls may have set it): another
    # count changes the order of the convolutions' sums, and the outputs are compared bit for bit
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, str(script), str(folder), how, str(tmp_path / "x.safetensors"),
                             str(tmp_path / "y.safetensors")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return safetensors_torch.load_file(tmp_path / "y.safetensors")["y"]


def assert_saved_as_safetensors(folder: Path, model):
    names = sorted(path.name for path in folder.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))]
    stored = safetensors_torch.load_file(folder / "model.safetensors")
    assert stored.keys() == model.state_dict().keys()


@pytest.mark.parametrize("build,options", [(hf_resnet, {}), (hf_convnext, {"linear": True})],
                         ids=["resnet", "convnext-linear"])
def test_transformers_model_save_pretrained_then_from_pretrained_in_a_new_process(build, options, tmp_path):
    torch.manual_seed(0)
    model = trained_looking(gpconv.convert(build(), CHANNELS_PER_GROUP, exclude=["classifier"], **options))
    hub.save_pretrained(model, tmp_path / "saved")
    assert_saved_as_safetensors(tmp_path / "saved", model)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] in ("resnet", "convnext") and config["gpconv"] == hub.conversion_record(model)
    with torch.no_grad():
        expected = logits(model, X)
        torch.manual_seed(1)
        assert not torch.equal(logits(trained_looking(gpconv.convert(build(), CHANNELS_PER_GROUP,
                                                                     exclude=["classifier"], **options)), X),
                               expected)
    assert torch.equal(outputs_in_new_process(tmp_path / "saved", "from_pretrained", tmp_path), expected)


def test_timm_model_round_trip_through_local_dir_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(hub.create_model("mobilenetv3_small_050", num_classes=10,
                                             channels_per_group=CHANNELS_PER_GROUP))
    hub.save_pretrained(model, tmp_path / "saved")
    assert_saved_as_safetensors(tmp_path / "saved", model)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == "mobilenetv3_small_050" and set(config["gpconv"]["channels_per_group"].values()) == {8}
    assert "gpconv" not in config["pretrained_cfg"]  # timm's own loader builds a PretrainedCfg from it
    with torch.no_grad():
        expected = model(X)
    assert torch.equal(outputs_in_new_process(tmp_path / "saved", "create_model", tmp_path), expected)
    # and in this process, through from_pretrained, which reads timm's config the same way
    with torch.no_grad():
        assert torch.equal(hub.from_pretrained(tmp_path / "saved").eval()(X), expected)


def test_torchvision_model_round_trip_with_the_base_model_given(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(gpconv.convert(tv_models.mobilenet_v3_small(num_classes=10), CHANNELS_PER_GROUP,
                                           exclude=["classifier"]))
    hub.save_pretrained(model, tmp_path / "saved")
    assert_saved_as_safetensors(tmp_path / "saved", model)
    with pytest.raises(ValueError, match="pass model=") as info:
        hub.from_pretrained(tmp_path / "saved")
    assert "\n" not in str(info.value)
    torch.manual_seed(1)
    loaded = hub.from_pretrained(tmp_path / "saved", tv_models.mobilenet_v3_small(num_classes=10)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_record_names_every_grouped_layer_and_the_settings(tmp_path):
    model = gpconv.convert(hf_convnext(), 4, version=1, l_layer=False, activation="relu",
                           exclude=["classifier", "convnext.encoder.stages.3.*"], linear=True)
    record = hub.conversion_record(model)
    assert record["channels_per_group"] == {row.name: 4 for row in gpconv.summarize(model).rows}
    assert not [name for name in record["channels_per_group"] if name.startswith("convnext.encoder.stages.3.")]
    assert (record["version"], record["l_layer"], record["activation"], record["linear"]) == (1, False, "relu", True)
    assert record["gpconv_version"] == gpconv.__version__
    hub.save_pretrained(model, tmp_path / "saved")
    again = hub.from_pretrained(tmp_path / "saved")
    assert hub.conversion_record(again) == record
    with torch.no_grad():
        assert torch.equal(logits(again, X), logits(model.eval(), X))


def test_an_activation_given_as_a_module_cannot_be_recorded(tmp_path):
    model = gpconv.convert(tv_models.resnet18(num_classes=10), CHANNELS_PER_GROUP, activation=torch.nn.GELU(),
                           exclude=["fc"])
    with pytest.raises(ValueError, match="activation was given as a module") as info:
        hub.save_pretrained(model, tmp_path / "saved")
    assert "\n" not in str(info.value) and not (tmp_path / "saved").exists()


def test_create_model_gives_a_timm_k_variant_with_the_classifier_dense():
    model = hub.create_model("convnext_atto", num_classes=10, linear=True)
    reference = gpconv.convert(timm.create_model("convnext_atto", num_classes=10), 16, exclude=["head.fc"],
                               linear=True)
    assert gpconv.count_parameters(model) == gpconv.count_parameters(reference)
    assert [layer.name for layer in gpconv.summarize(model).kept if layer.reason == "excluded"] == ["head.fc"]
    assert isinstance(model.head.fc, torch.nn.Linear) and model(X).shape == (2, 10)


def test_create_model_refuses_settings_for_a_recorded_folder(tmp_path):
    hub.save_pretrained(hub.create_model("mobilenetv3_small_050", num_classes=10), tmp_path / "saved")
    with pytest.raises(ValueError, match="records its conversion: leave channels_per_group out") as info:
        hub.create_model(f"local-dir:{tmp_path / 'saved'}", channels_per_group=8)
    assert "\n" not in str(info.value)


def test_base_model_that_does_not_fit_the_record_is_refused_in_one_line(tmp_path):
    model = gpconv.convert(tv_models.resnet18(num_classes=10), CHANNELS_PER_GROUP, exclude=["fc"])
    hub.save_pretrained(model, tmp_path / "saved")
    with pytest.raises(ValueError, match="does not fit") as info:
        hub.from_pretrained(tmp_path / "saved", tv_models.resnet34(num_classes=10))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="does not fit") as info:  # same layers, another classifier
        hub.from_pretrained(tmp_path / "saved", tv_models.resnet18(num_classes=7))
    assert "\n" not in str(info.value)


def test_existing_files_are_not_replaced_without_overwrite(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    model = gpconv.convert(tv_models.resnet18(num_classes=10), CHANNELS_PER_GROUP, exclude=["fc"])
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        hub.save_pretrained(model, folder)
    assert "\n" not in str(info.value)
    assert (folder / "config.json").read_text() == "{}" and not (folder / "model.safetensors").exists()
    hub.save_pretrained(model, folder, overwrite=True)
    assert json.loads((folder / "config.json").read_text())["gpconv"] == hub.conversion_record(model)


@pytest.mark.parametrize("case", ["missing", "missing, relative", "file", "no config", "no record", "bad json", "bad weights",
                                  "old format", "dense model"])
def test_bad_folders_give_one_line_errors(case, tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    base = tv_models.resnet18(num_classes=10)
    if case == "dense model":
        with pytest.raises(ValueError, match="no conversion record") as info:
            hub.save_pretrained(base, folder)
        assert "\n" not in str(info.value) and not list(folder.iterdir())
        return
    hub.save_pretrained(gpconv.convert(base, CHANNELS_PER_GROUP, exclude=["fc"]), folder)
    config = json.loads((folder / "config.json").read_text())
    source, error = folder, ValueError
    if case == "missing":
        source, error = tmp_path / "nowhere" / "folder", FileNotFoundError
    elif case == "missing, relative":  # "folder/nothing" could be a hub id, but folder/ is here: a typo
        monkeypatch.chdir(tmp_path)
        source, error = Path("folder") / "nothing", FileNotFoundError
    elif case == "file":
        source, error = folder / "model.safetensors", NotADirectoryError
    elif case == "no config":
        (folder / "config.json").unlink()
        error = FileNotFoundError
    elif case == "no record":
        (folder / "config.json").write_text(json.dumps({"hidden": 3}))
    elif case == "bad json":
        (folder / "config.json").write_text("{")
    elif case == "bad weights":
        (folder / "model.safetensors").write_bytes(b"not safetensors")
    elif case == "old format":
        config["gpconv"]["format"] = 99
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error) as info:
        hub.from_pretrained(source, tv_models.resnet18(num_classes=10))
    assert str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def torch_alone(tmp_path_factory):
    return _link_torch_alone(tmp_path_factory.mktemp("torch_alone"))


def test_hub_and_pruning_import_with_torch_alone(torch_alone):
    code = ("import importlib.util\n"
            "assert not [m for m in ('timm', 'transformers', 'safetensors', 'torch_pruning', 'torchvision') "
            "if importlib.util.find_spec(m)], 'not torch alone'\n"
            "import gpconv, gpconv.hub, gpconv.pruning\nprint('ok')\n")
    result = _run(torch_alone, code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
