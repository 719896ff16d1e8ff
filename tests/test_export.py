"""ONNX export (gpconv.export, `gpconv export`): verified against torch, int8, bad input."""

import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

import gpconv
from conftest import SHARED
from gpconv.cli import main

CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"


def _deploy_installed():
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401, E401
    except ImportError:
        return False
    return True


needs_deploy = pytest.mark.skipif(not _deploy_installed(), reason="the deploy extra (onnx, onnxruntime) is absent")


def _real_images(count, size=16):
    """CIFAR-10 subset test images when present (real), else synthetic ones, as floats."""
    from gpconv.experiments.data import load_dataset, to_float

    if (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        splits = load_dataset("cifar10", CIFAR_SUBSET, image_size=size)
    else:
        splits = load_dataset("synthetic", image_size=size, synthetic_size=(count, count))
    return to_float(splits.test.images[:count])


def _converted_model(images):
    """A model of plain torch modules put through gpconv.core.convert, batch norms set on ``images``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 64, 1),
                        nn.BatchNorm2d(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    model = gpconv.convert(net, channels_per_group=16)
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


@needs_deploy
def test_converted_model_exports_with_dynamic_batch_and_matches_torch(tmp_path):
    from gpconv.export import onnx_session

    images = _real_images(24)
    model = _converted_model(images)
    result = gpconv.export_onnx(model, tmp_path / "model.onnx", images[:2], verify_input=images)
    assert result.max_difference <= 1e-4 and result.max_output > 0.1  # logits far from zero: a real check
    session = onnx_session(result.path, threads=1)
    for batch in (1, 5):
        got = session.run(None, {"images": images[:batch].numpy()})[0]
        np.testing.assert_allclose(got, model(images[:batch]).detach().numpy(), atol=1e-4)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write: no temporary left


@needs_deploy
def test_a_wrong_graph_is_caught_and_nothing_written(tmp_path, monkeypatch):
    import gpconv.export as export

    images = _real_images(8)
    model = _converted_model(images)
    wrong = export.onnx_form(model)
    with torch.no_grad():
        wrong[-1].bias.add_(1e-3)  # a difference the 1e-4 check must see
    monkeypatch.setattr(export, "onnx_form", lambda model, form=None: wrong)
    with pytest.raises(export.DeployError, match="differs from torch"):
        export.export_onnx(model, tmp_path / "model.onnx", images[:2], verify_input=images)
    assert not list(tmp_path.iterdir())


@needs_deploy
def test_int8_model_keeps_the_predictions(tmp_path):
    import onnx

    from gpconv.export import onnx_session, quantize_onnx

    images = _real_images(64)
    model = _converted_model(images)
    fp32 = gpconv.export_onnx(model, tmp_path / "model.onnx", images[:2], verify_input=images).path
    int8 = quantize_onnx(fp32, tmp_path / "model.int8.onnx", images[:32])
    operators = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    expected = model(images).detach().numpy()
    got = onnx_session(int8, threads=1).run(None, {"images": images.numpy()})[0]
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()  # int8 rounding, not a broken graph
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9


FAMILIES = [("densenet_bc_100", 32), ("efficientnet_b0", 32), ("inception_v3", 75), ("mobilenet", 32),
            ("mobilenet_v3_large", 32)]


@needs_deploy
@pytest.mark.parametrize("grouping", [[], ["--channels-per-group", "16"]], ids=["baseline", "16ch"])
@pytest.mark.parametrize("arch,size", FAMILIES)
def test_cli_exports_every_family(arch, size, grouping, tmp_path, capsys):
    output = tmp_path / f"{arch}.onnx"
    assert main(["export", arch, *grouping, "--image-size", str(size), "--output", str(output),
                 "--calibration-images", "16", "--verify-images", "4", "--threads", "2"]) == 0
    line = capsys.readouterr().out
    assert output.is_file() and f"wrote {output} ({arch}, {size}x{size} input, dynamic batch)" in line
    difference = float(line.split("max |difference| ")[1].split()[0])
    scale = float(line.split("outputs up to ")[1].split(")")[0])
    assert difference <= 1e-4 * max(1.0, scale) and scale > 1e-3  # batch norm set from the images: not near zero


def _checkpoint(tmp_path, images):
    """A gpconv checkpoint (synthetic dataset) of a small trained-looking k-model."""
    from gpconv.experiments.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save
    from gpconv.experiments.config import ModelConfig
    from gpconv.experiments.metrics import recalibrate_batch_norm
    from gpconv.experiments.data import ImageSet

    config = ModelConfig("mobilenet", channels_per_group=16, image_size=32)
    model = config.build()
    recalibrate_batch_norm(model, ImageSet((images * 255).to(torch.uint8), torch.zeros(len(images))), 2, 16, "cpu")
    state = {"format": CHECKPOINT_FORMAT, "model_config": asdict(config), "model": model.state_dict(),
             "train_config": {"dataset": "synthetic", "data_dir": None}, "epoch": 1,
             "class_names": [str(i) for i in range(10)]}
    return atomic_torch_save(state, tmp_path / "best.pt")


@needs_deploy
def test_cli_checkpoint_int8_prints_accuracies(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, _real_images(32, size=32))
    assert main(["export", "--checkpoint", str(checkpoint), "--int8", "--calibration-images", "32",
                 "--verify-images", "8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "best.onnx").is_file() and (tmp_path / "best.int8.onnx").is_file()
    assert "test accuracy on " in out and "ONNX Runtime fp32 " in out and " int8 " in out and "points)" in out


def _openvino_installed():
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return _deploy_installed()


needs_openvino = pytest.mark.skipif(not _openvino_installed(), reason="openvino (deploy extra) is absent")


@needs_openvino
def test_cli_openvino_reports_default_precision_and_f32(tmp_path, capsys):
    from gpconv.export import openvino_default_precision

    checkpoint = _checkpoint(tmp_path, _real_images(32, size=32))
    assert main(["export", "--checkpoint", str(checkpoint), "--openvino", "--verify-images", "8",
                 "--threads", "2"]) == 0
    out = capsys.readouterr().out
    scale = float(out.split("outputs up to ")[1].split(")")[0])
    line = out.splitlines()[-1]
    default = openvino_default_precision()
    assert f"default precision on this CPU: {default}" in line and f"OpenVINO {default} " in line
    f32 = float(line.split("OpenVINO f32 ")[1].split("max |difference| ")[1].rstrip(")"))
    assert f32 <= 1e-4 * max(1.0, scale)  # f32 is OpenVINO's exact mode: it must match torch as ONNX Runtime does


@needs_openvino
def test_openvino_compile_refuses_an_unknown_precision(tmp_path):
    from gpconv.export import DeployError, openvino_compile

    images = _real_images(16)[:4]
    path = gpconv.export_onnx(_converted_model(images), tmp_path / "m.onnx", images[:2], verify_input=images).path
    with pytest.raises(DeployError, match="unknown OpenVINO precision 'fp16'"):
        openvino_compile(path, precision="fp16")
    compiled = openvino_compile(path, (4, 3, 16, 16), threads=1, precision="f32")
    assert compiled(images.numpy())[0].shape == (4, 10)


@needs_openvino
def test_openvino_chunked_returns_the_whole_batch_in_order(tmp_path):
    from gpconv.export import openvino_chunked, openvino_compile

    images = _real_images(21)
    path = gpconv.export_onnx(_converted_model(images), tmp_path / "m.onnx", images[:2], verify_input=images).path
    whole = openvino_compile(path, threads=1, precision="f32")(images.numpy())[0]
    chunked = openvino_chunked(path, 8, (3, 16, 16), threads=2, precision="f32", streams=2)
    for count in (21, 5):  # two full chunks and a padded one; one padded chunk
        logits = chunked(images[:count].numpy())
        assert logits.shape == (count, 10) and np.abs(logits - whole[:count]).max() <= 1e-5


def _one_line_error(argv):
    result = subprocess.run([sys.executable, "-m", "gpconv.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("argv,message", [
    (["export", "resnet50"], "invalid choice"),
    (["export"], "exactly one of ARCH or --checkpoint"),
    (["export", "--checkpoint", "/nonexistent/best.pt"], "does not exist"),
])
def test_bad_input_is_one_line(argv, message):
    if message == "does not exist" and not _deploy_installed():
        message = "deploy extra"
    assert message in _one_line_error(argv)


@needs_deploy
def test_unwritable_or_foreign_output_is_refused(tmp_path):
    assert "does not exist" in _one_line_error(["export", "mobilenet", "--image-size", "32", "--output",
                                                str(tmp_path / "missing" / "m.onnx")])
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("not mine")
    assert "was not written by gpconv" in _one_line_error(["export", "mobilenet", "--image-size", "32", "--output",
                                                           str(foreign)])
    assert foreign.read_text() == "not mine"


def test_missing_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["export", "mobilenet", "--output", "never.onnx"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'gpconv[deploy]'" in err and len(err.strip().splitlines()) == 1


def test_missing_openvino_is_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)
    output = tmp_path / "never.onnx"
    assert main(["export", "mobilenet", "--openvino", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "openvino is not installed" in err and len(err.strip().splitlines()) == 1 and not output.exists()


def test_readme_functions_are_exported():
    assert callable(gpconv.prepare_for_inference) and callable(gpconv.export_onnx)
    assert {"prepare_for_inference", "export_onnx"} <= set(gpconv.__all__)
