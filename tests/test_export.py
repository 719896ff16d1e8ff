"""ONNX export (gpconv.export, `gpconv export`): verified against torch, int8, bad input."""

import copy
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

import gpconv
from conftest import SHARED, gpconv_cli
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
        splits = load_dataset("synthetic", image_size=size, synthetic_size=(max(count, 20), count))  # a validation split too
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
def test_both_exporters_write_the_same_function_and_the_fast_one_falls_back(tmp_path, monkeypatch, capsys):
    import onnx

    import gpconv.export as export
    from gpconv.export import onnx_session

    images = _real_images(8)
    model = _converted_model(images)
    outputs = {}
    for dynamo, expected in ((None, "torchscript"), (True, "dynamo")):
        result = export.export_onnx(model, tmp_path / f"{expected}.onnx", images[:2], verify_input=images, dynamo=dynamo)
        assert result.exporter == expected
        props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
        assert props["gpconv.exporter"] == expected
        outputs[expected] = onnx_session(result.path, threads=1).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(outputs["torchscript"], outputs["dynamo"], atol=1e-5)

    def broken(*args):
        raise RuntimeError("ONNX export of convolution for kernel of unknown shape\nmore")

    # a TorchScript file that fails the check: the default exports again with the other exporter
    real = export.exporter._torchscript_bytes

    def wrong(form, example, opset):
        real(form, example, opset)  # the real exporter runs on the module itself first: whatever it leaves behind
        shifted = copy.deepcopy(form)
        with torch.no_grad():
            shifted.model[-1].bias.add_(1e-2)  # the classifier of _converted_model: a difference the check sees
        return real(shifted, example, opset)

    monkeypatch.setattr(export.exporter, "_torchscript_bytes", wrong)
    result = export.export_onnx(model, tmp_path / "checked.onnx", images[:2], verify_input=images)
    assert result.exporter == "dynamo" and result.max_difference <= 1e-4
    with pytest.raises(export.DeployError, match="differs from torch"):
        export.export_onnx(model, tmp_path / "unchecked.onnx", images[:2], verify_input=images, dynamo=False)

    monkeypatch.setattr(export.exporter, "_torchscript_bytes", broken)
    result = export.export_onnx(model, tmp_path / "fallback.onnx", images[:2], verify_input=images)
    assert result.exporter == "dynamo"  # the default falls back to the torch.export-based exporter
    with pytest.raises(export.DeployError, match="^the TorchScript-based ONNX exporter failed: ONNX export of convolution "
                                                 "for kernel of unknown shape$"):
        export.export_onnx(model, tmp_path / "forced.onnx", images[:2], verify_input=images, dynamo=False)
    assert not (tmp_path / "forced.onnx").exists()


@needs_deploy
@pytest.mark.parametrize("dynamo", [False, True])
def test_exporting_leaves_every_module_in_its_training_mode(dynamo):
    """PyTorch's exporters restore the top module's mode on every submodule: an eval-mode model inside a
    wrapper in training mode came out with its batch norms training, and the next export of it (the
    fallback after a TorchScript file failed the check) computed batch statistics."""
    from gpconv.export.exporter import _dynamo_proto
    from gpconv.export.tuning import torchscript_onnx

    images = _real_images(4)
    wrapper = nn.Sequential(_converted_model(images))  # a fresh Sequential: training mode, its model in eval
    wrapper[0][1].train()  # and one batch norm inside in training mode: mixed modes come back as they were
    before = [module.training for module in wrapper.modules()]
    if dynamo:
        _dynamo_proto(wrapper, images[:2], None)
    else:
        torchscript_onnx(wrapper, images[:2], "images")
    assert [module.training for module in wrapper.modules()] == before


@needs_deploy
def test_a_batch_size_baked_into_the_file_is_caught(tmp_path):
    import gpconv.export as export

    class FixedBatch(nn.Module):  # flattens with the traced batch size as a constant: wrong at any other batch
        def forward(self, images):
            return images.mean((2, 3)).reshape(2 if torch.jit.is_tracing() else len(images), -1)

    images = _real_images(8)
    with pytest.raises(export.DeployError, match="^the exported model (fails|returns)"):
        export.export_onnx(FixedBatch(), tmp_path / "model.onnx", images[:2], verify_input=images[:2].repeat(2, 1, 1, 1),
                           dynamo=False)
    assert not (tmp_path / "model.onnx").exists()


@needs_deploy
def test_a_wrong_graph_is_caught_and_nothing_written(tmp_path, monkeypatch):
    import gpconv.export as export

    images = _real_images(8)
    model = _converted_model(images)
    wrong = export.onnx_form(model)
    with torch.no_grad():
        wrong[-1].bias.add_(1e-3)  # a difference the 1e-4 check must see
    monkeypatch.setattr(export.exporter, "onnx_form", lambda model, form=None: wrong)
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


# every family grouped; the dense baseline once (its layers are plain torch ones in every family: one
# export of 20-40 s each per family would test the same path again)
EXPORT_CASES = [(arch, size, ["--channels-per-group", "16"]) for arch, size in FAMILIES] + [("efficientnet_b0", 32, [])]


@needs_deploy
@pytest.mark.parametrize("arch,size,grouping", EXPORT_CASES,
                         ids=[f"{arch}-{'baseline' if not grouping else '16ch'}" for arch, _, grouping in EXPORT_CASES])
def test_cli_exports_every_family(arch, size, grouping, tmp_path, capsys):
    output = tmp_path / f"{arch}.onnx"
    assert main(["export", arch, *grouping, "--image-size", str(size), "--output", str(output),
                 "--calibration-images", "16", "--verify-images", "4", "--threads", "2"]) == 0
    line = capsys.readouterr().out
    assert output.is_file() and f"wrote {output} ({arch}, {size}x{size} input, dynamic batch)" in line
    difference = float(line.split("max |difference| ")[1].split()[0])
    scale = float(line.split("outputs up to ")[1].split(")")[0])
    # the line prints 2 significant digits: allow their rounding; batch norm set from the images: not near zero
    assert difference <= 1.05e-4 * max(1.0, scale) and scale > 1e-3


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
             "train_config": {"dataset": "synthetic", "data_dir": None, "synthetic_size": [64, 32]}, "epoch": 1,
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


def _one_line_error(argv, process=False):
    result = gpconv_cli(*argv, process=process)
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
    assert message in _one_line_error(argv, process=True)  # as a shell sees it: no warning or traceback either


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


# ------------------------------------------------------------------------------------------ issue 22


class _Returns(nn.Module):
    """A small classifier whose forward returns ``wrap(logits, features)``: a tuple, a dict, a ModelOutput."""

    def __init__(self, wrap, scale=10.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.linear, self.wrap, self.scale = nn.Conv2d(3, 8, 3), nn.Linear(8, 5), wrap, scale

    def forward(self, images):
        features = self.conv(images).mean((2, 3))
        return self.wrap(self.linear(features) * self.scale, features)


def _model_output(logits, features):
    output = pytest.importorskip("transformers.modeling_outputs")
    return output.ImageClassifierOutput(logits=logits, hidden_states=(features,))


@needs_deploy
@pytest.mark.parametrize("wrap,name", [
    (lambda logits, features: (logits, features), None),
    (lambda logits, features: [logits, features], None),
    (lambda logits, features: {"logits": logits, "features": features}, None),
    (lambda logits, features: {"scores": logits, "features": features}, "scores"),
    (_model_output, None),
], ids=["tuple", "list", "dict-logits", "named", "ModelOutput"])
def test_export_takes_what_third_party_models_return(wrap, name, tmp_path):
    from gpconv.export import onnx_session

    model = _Returns(wrap).eval()
    images = torch.rand(6, 3, 12, 12)
    result = gpconv.export_onnx(model, tmp_path / "m.onnx", images[:2], verify_input=images, output=name)
    expected = model.linear(model.conv(images).mean((2, 3))).detach().numpy() * 10
    got = onnx_session(result.path, threads=1).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert result.note is None and result.max_output > 1


@pytest.mark.parametrize("model,images,message", [
    (_Returns(lambda logits, features: {"scores": logits}), torch.rand(4, 3, 8, 8), "without 'logits'"),
    (_Returns(lambda logits, features: "text"), torch.rand(4, 3, 8, 8), "returns a str"),
    (_Returns(lambda logits, features: (logits.long(),)), torch.rand(4, 3, 8, 8), "float32 tensor"),
    (_Returns(lambda logits, features: logits).double(), torch.rand(4, 3, 8, 8), "float64 weights"),
    (_Returns(lambda logits, features: logits).to(torch.bfloat16), torch.rand(4, 3, 8, 8), "bfloat16 weights"),
    (_Returns(lambda logits, features: logits), torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), "uint8"),
], ids=["dict-without-logits", "string", "integer-output", "float64", "bfloat16", "uint8-images"])
def test_export_refuses_what_it_cannot_export_before_the_work(model, images, message, tmp_path, monkeypatch):
    import gpconv.export as export

    def no_export(*args, **kwargs):
        raise AssertionError("the export ran before the refusal")

    monkeypatch.setattr(export.exporter, "_export_proto", no_export)
    with pytest.raises(export.DeployError, match=message):
        export.export_onnx(model, tmp_path / "m.onnx", images)
    with pytest.raises(export.DeployError, match=r"cannot run example_input of shape \(4, 1, 8, 8\)"):
        export.export_onnx(_Returns(lambda logits, features: logits), tmp_path / "m.onnx", torch.rand(4, 1, 8, 8))
    with pytest.raises(export.DeployError, match="no output named 'scores'"):
        export.export_onnx(_Returns(lambda logits, features: {"logits": logits}), tmp_path / "m.onnx",
                           torch.rand(4, 3, 8, 8), output="scores")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("count", [0, 1, 3])
def test_verification_refuses_an_empty_or_tiny_set(count, tmp_path):
    from gpconv.export import MIN_VERIFY_IMAGES, DeployError

    images = torch.rand(8, 3, 8, 8)
    with pytest.raises(DeployError, match=f"at least {MIN_VERIFY_IMAGES} images, got {count}"):
        gpconv.export_onnx(_Returns(lambda logits, features: logits), tmp_path / "m.onnx", images[:2],
                           verify_input=images[:count])
    with pytest.raises(DeployError, match="one size"):
        gpconv.export_onnx(_Returns(lambda logits, features: logits), tmp_path / "m.onnx", images[:2],
                           verify_input=torch.rand(8, 3, 9, 9))
    assert not list(tmp_path.iterdir())


@needs_deploy
def test_near_zero_outputs_are_said_and_files_follow_the_output_rule(tmp_path):
    from gpconv.export import DeployError, onnx_session, quantize_onnx

    images = torch.rand(8, 3, 8, 8)
    tiny = _Returns(lambda logits, features: logits, scale=1e-9).eval()
    with pytest.warns(UserWarning, match="near zero"):
        result = gpconv.export_onnx(tiny, tmp_path / "m.onnx", images[:2], verify_input=images)
    assert result.note and "near zero" in result.note
    first = result.path.read_bytes()
    for call in (lambda: gpconv.export_onnx(tiny, result.path, images),
                 lambda: quantize_onnx(result.path, result.path, images, overwrite=True),
                 lambda: quantize_onnx(tmp_path / "absent.onnx", tmp_path / "q.onnx", images),
                 lambda: quantize_onnx(result.path, tmp_path / "q.onnx", torch.rand(8, 3, 9, 9))):
        with pytest.raises(DeployError):
            call()
    assert result.path.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(DeployError, match="ONNX Runtime cannot load .*notes.onnx"):
        onnx_session(tmp_path / "notes.onnx")
    with pytest.raises(DeployError, match="not an ONNX file"):
        quantize_onnx(tmp_path / "notes.onnx", tmp_path / "q.onnx", images)
    (tmp_path / "notes.onnx").unlink()
    quantize_onnx(result.path, tmp_path / "q.onnx", images)
    with pytest.raises(DeployError, match="already exists; pass --overwrite"):
        quantize_onnx(result.path, tmp_path / "q.onnx", images)
    quantize_onnx(result.path, tmp_path / "q.onnx", images, overwrite=True)
    model = _Returns(lambda logits, features: logits).eval()
    assert gpconv.export_onnx(model, result.path, images, overwrite=True).note is None
    assert result.path.read_bytes() != first


@needs_openvino
def test_openvino_refuses_a_size_the_file_was_not_exported_for(tmp_path):
    """The export bakes Keras "same" padding for the exported size: another size would run, wrongly."""
    from gpconv.export import DeployError, openvino_chunked, openvino_compile

    images = _real_images(8, size=32)
    model = gpconv.create_model("mobilenet", 10, channels_per_group=16).eval()
    path = gpconv.export_onnx(model, tmp_path / "m.onnx", images[:2], verify_input=images).path
    for shape in ((2, 3, 33, 33), (2, 3, 47, 47), (2, 3, 48, 48), (2, 1, 32, 32), (3, 32, 32)):
        with pytest.raises(DeployError, match=r"takes inputs of shape \(batch, 3, 32, 32\)"):
            openvino_compile(path, shape, threads=1, precision="f32")
    with pytest.raises(DeployError, match="takes inputs of shape"):
        openvino_chunked(path, 4, (3, 33, 33), threads=1, precision="f32")
    with pytest.raises(DeployError, match="OpenVINO cannot read"):
        openvino_compile(tmp_path / "absent.onnx")
    run = openvino_chunked(path, 4, (3, 32, 32), threads=1, precision="f32", streams=1)
    with pytest.raises(DeployError, match="compiled for images of shape"):
        run(torch.rand(4, 3, 33, 33).numpy())
    got = openvino_compile(path, (5, 3, 32, 32), threads=1, precision="f32")(images[:5].numpy())[0]
    np.testing.assert_allclose(got, model(images[:5]).detach().numpy(), atol=1e-4)  # another batch is fine


def _parse(argv):
    from gpconv.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize("options", [[], ["--channels-per-group", "16"], ["--activation", "relu", "--no-l-layer",
                                                                          "--channels-per-group", "8"]])
@pytest.mark.parametrize("arch", [arch for arch, _ in FAMILIES])
def test_export_arch_builds_the_model_train_builds(arch, options):
    from gpconv.cli.export import _arch_config
    from gpconv.cli.train import MODEL_OPTIONS
    from gpconv.experiments.config import ModelConfig

    exported = _arch_config(_parse(["export", arch, *options]))
    trained = _parse(["train", "--arch", arch, "--dataset", "synthetic", "--output", "x", *options])
    assert {name: getattr(exported, name) for name in MODEL_OPTIONS} == {name: getattr(trained, name)
                                                                         for name in MODEL_OPTIONS}
    with torch.device("meta"):
        built = [type(m) for m in exported.build().modules()]
        reference = [type(m) for m in ModelConfig(arch, image_size=224, **{n: getattr(trained, n) for n in MODEL_OPTIONS})
                     .build().modules()]
    assert built == reference  # same activations (ReLU, ReLU6, hard-swish ...), not SiLU everywhere


def test_export_refuses_arch_options_with_a_checkpoint(tmp_path):
    for flag in (["--channels-per-group", "16"], ["--activation", "relu"], ["--no-l-layer"], ["--num-classes", "3"]):
        assert "describes an untrained ARCH" in _one_line_error(["export", "--checkpoint", str(tmp_path / "b.pt"),
                                                                 *flag])
    assert "an integer >= 4" in _one_line_error(["export", "mobilenet", "--verify-images", "2"])
    assert "a number > 0" in _one_line_error(["export", "mobilenet", "--tolerance", "nan"])


@needs_deploy
def test_cli_export_twice_refuses_then_overwrites(tmp_path, capsys):
    output = tmp_path / "m.onnx"
    argv = ["export", "mobilenet", "--image-size", "32", "--output", str(output), "--verify-images", "4",
            "--calibration-images", "8", "--threads", "1"]
    assert main(argv) == 0
    first = output.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "already exists; pass --overwrite" in captured.err and captured.out == ""  # refused before any work
    assert output.read_bytes() == first
    assert main(argv + ["--overwrite"]) == 0 and output.is_file()


TINY_RUN = ["--arch", "efficientnet_b0", "--image-size", "16", "--batch-size", "8", "--max-train-batches", "2",
            "--epochs", "1", "--threads", "1", "--no-augment"]


def _folder_dataset(root, classes=3, per_class=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True)
        for index in range(per_class):
            colour = np.zeros(3)
            colour[label % 3] = 200
            pixels = np.clip(rng.normal(colour, 60, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{label}" / f"{index}.png")
    return root


@needs_deploy
@pytest.mark.parametrize("data", [["--dataset", "folder", "--seed", "3"],
                                  ["--dataset", "synthetic", "--synthetic-size", "90,30", "--seed", "5"]],
                         ids=["folder", "synthetic"])
def test_export_measures_the_runs_own_test_images(data, tmp_path, capsys):
    """Issue 22's acceptance: export --int8 prints evaluate's torch accuracy, on the run's test split."""
    from gpconv.cli.export import _model_and_data
    from gpconv.experiments.checkpoint import checkpoint_test_split, load_model_from_checkpoint
    from gpconv.experiments.data import load_dataset

    if "folder" in data:
        data = data + ["--data-dir", str(_folder_dataset(tmp_path / "vehicles"))]
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, *data, "--output", str(run)]) == 0
    assert main(["evaluate", "--checkpoint", str(run / "best.pt")]) == 0
    evaluated = capsys.readouterr().out.splitlines()[-1]
    accuracy, images = evaluated.split("test accuracy ")[1].split()[0], evaluated.split("(")[1].split()[0]
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--int8", "--threads", "1",
                 "--verify-images", "4"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert f"test accuracy on the {images} " in line and f"torch {accuracy} " in line and "the run's split" in line

    args = _parse(["export", "--checkpoint", str(run / "best.pt"), "--calibration-images", "1000"])
    _, config, splits, _ = _model_and_data(args)
    _, _, checkpoint = load_model_from_checkpoint(run / "best.pt")
    _, own = checkpoint_test_split(run / "best.pt", checkpoint, config)
    assert torch.equal(splits.test.images, own.test.images) and torch.equal(splits.train.images, own.train.images)
    test_images = {bytes(image.numpy()) for image in own.test.images}
    assert not test_images & {bytes(image.numpy()) for image in splits.train.images}  # calibration: no test image
    if "folder" in data:  # seed 0 splits differently: the images export used to measure on
        other = load_dataset("folder", data[data.index("--data-dir") + 1], image_size=16, seed=0)
        assert not torch.equal(other.test.images, own.test.images)


def test_cpu_description_names_the_model_and_the_matrix_features(tmp_path):
    from gpconv.export import cpu_description

    block = ("processor\t: {n}\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
             "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_int8 avx512_vnni\n\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block.format(n=0) + block.format(n=1).replace("Platinum 8480+", "other"))
    text = cpu_description(str(cpuinfo))
    assert text.startswith("Intel(R) Xeon(R) Platinum 8480+, ")  # the first processor's name
    assert "AVX2, AVX-512, AVX512-VNNI, AVX512-BF16, AMX-BF16, AMX-INT8" in text and text.endswith("no AVX512-FP16")
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: avx2 avx512f\n")
    assert cpu_description(str(cpuinfo)).endswith("AVX2, AVX-512; no AVX512-VNNI, AVX512-BF16, AVX512-FP16, AMX-BF16, "
                                                  "AMX-INT8")
    assert cpu_description(str(tmp_path / "missing")).endswith("features unknown")


@needs_deploy
@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_transformers_models_export_through_their_logits(name, tmp_path):
    """A transformers classifier returns an ImageClassifierOutput: its logits are exported (issue 22)."""
    transformers = pytest.importorskip("transformers")
    from gpconv.export import onnx_session

    torch.manual_seed(0)
    if name == "resnet":
        config = transformers.ResNetConfig(num_labels=4, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1])
        model = gpconv.convert(transformers.ResNetForImageClassification(config), channels_per_group=4,
                               exclude=["classifier"])
    else:
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=16, num_labels=4)
        model = transformers.ViTForImageClassification(config)
    model.eval()
    images = torch.rand(4, 3, 32, 32)
    result = gpconv.export_onnx(model, tmp_path / "m.onnx", images[:2], verify_input=images)
    got = onnx_session(result.path, threads=1).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, model(images).logits.detach().numpy(), atol=1e-4)
