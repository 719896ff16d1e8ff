"""Exports tuned for a runtime (export_onnx(..., tune=...), gpconv export --tune): each grouped block in the form
the runtime runs fastest, the choice in the file; no timing is asserted (benchmarks/runtimes.py measures)."""

import json

import pytest
import torch

import gpconv
from gpconv.cli import main
from gpconv.core.inference import FoldedGroupedPointwiseConv2d
from test_export import _converted_model, _real_images, needs_deploy, needs_openvino

pytestmark = needs_deploy


def ranking_timer(prefer):
    """A stand-in for a runtime: ``prefer(module) -> seconds``, whatever the input."""
    return lambda runtime, precision=None, threads=None: (lambda module, x, fresh=False: prefer(module))


def is_whole_model(module):
    return not hasattr(module, "execution") and not hasattr(module, "group_factor")


def prefers_dense(module):
    if is_whole_model(module):  # the whole-model check: a tie, the per-block choice stays
        return 1.0
    return 1.0 if getattr(module, "form", None) == "dense" else 2.0


def prefers_grouped(largest_factor):
    def prefer(module):
        if is_whole_model(module):
            return 1.0
        if hasattr(module, "group_factor"):  # one layer: the largest (or smallest) group factor wins
            return 1.0 / module.group_factor if largest_factor else float(module.group_factor)
        return 1.0 if module.execution == "grouped" else 2.0
    return prefer


def grouped_convolutions(path):
    import onnx

    graph = onnx.load(str(path)).graph
    return [node for node in graph.node if node.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


def metadata(path):
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("prefer, expected, largest", [(prefers_dense, "dense", None),
                                                      (prefers_grouped(False), "grouped", False),
                                                      (prefers_grouped(True), "grouped", True)])
def test_tuned_export_keeps_the_form_the_runtime_runs_fastest(prefer, expected, largest, tmp_path, monkeypatch):
    monkeypatch.setattr(gpconv.export.tuning, "runtime_timer", ranking_timer(prefer))
    images = _real_images(16)
    model = _converted_model(images)
    result = gpconv.export_onnx(model, tmp_path / "tuned.onnx", images[:8], verify_input=images, tune="onnxruntime")
    forms = result.tuning["forms"]
    assert len(forms) == 2 and all(form.split()[0] == expected for form in forms.values())
    prepared = gpconv.prepare_for_inference(model, channels_last=False)
    blocks = {n: b for n, b in prepared.named_modules() if isinstance(b, FoldedGroupedPointwiseConv2d)}
    grouped_layers = 0
    if expected == "grouped":  # each layer's largest or smallest group factor: the one the stand-in timed fastest
        pick = max if largest else min
        factors = {n: [pick(layer.group_factors()) for layer in b.layers] for n, b in blocks.items()}
        assert forms == {n: "grouped " + " ".join(f"{kl}{f}" for kl, f in zip("KL", factors[n])) for n in blocks}
        grouped_layers = sum(layer.groups // f > 1 for n, b in blocks.items() for layer, f in zip(b.layers, factors[n]))
        assert grouped_layers == (0 if largest else 3)
    assert len(grouped_convolutions(result.path)) == grouped_layers  # the file holds the chosen forms
    assert result.tuning["kept"] == "per block" and set(result.tuning["model_seconds"]) == {"per block", "rule", "dense"}
    recorded = json.loads(metadata(result.path)["gpconv.tune"])
    assert recorded == result.tuning and recorded["input_shape"] == [8, 3, 16, 16]
    assert recorded["runtime"].startswith("onnxruntime ") and recorded["cpu"]
    assert result.max_difference <= 1e-4 * max(1.0, result.max_output)  # verified against torch as every export


def test_the_whole_model_check_keeps_the_dense_setting_when_it_runs_fastest(tmp_path, monkeypatch):
    """Blocks timed alone prefer grouped forms, the whole model runs fastest dense (the runtime fuses or reorders
    across blocks): the dense setting is exported, so the file is not slower than the dense model."""
    def prefer(module):
        if is_whole_model(module):  # fewer grouped blocks: faster
            return 1.0 + sum(m.execution != "dense" for m in module.modules() if hasattr(m, "executions"))
        return 1.0 if getattr(module, "execution", "grouped") == "grouped" else 2.0

    monkeypatch.setattr(gpconv.export.tuning, "runtime_timer", ranking_timer(prefer))
    images = _real_images(16)
    result = gpconv.export_onnx(_converted_model(images), tmp_path / "d.onnx", images[:8], verify_input=images,
                                tune="onnxruntime")
    # kept: "dense", or "rule" where the rule's forms are the dense ones (small blocks): the same file
    assert result.tuning["kept"] != "per block" and not grouped_convolutions(result.path)
    assert result.tuning["model_seconds"]["dense"] < result.tuning["model_seconds"]["per block"]
    assert set(result.tuning["forms"].values()) <= {"dense", "factored K1"}


def test_onnxruntime_timer_times_each_shape_once(monkeypatch):
    from gpconv.export import tuning as export  # runtime_timer looks onnx_session up there

    sessions = []
    real_session = export.onnx_session
    monkeypatch.setattr(export, "onnx_session", lambda *a, **k: sessions.append(a) or real_session(*a, **k))
    timer = export.runtime_timer("onnxruntime", threads=1)
    first, second = (gpconv.GroupedPointwiseConv2d(64, 96, 16).eval().fold() for _ in range(2))
    x = torch.randn(2, 64, 8, 8)
    seconds = timer(first, x)
    assert seconds > 0 and timer(second, x) == seconds and len(sessions) == 1  # same shapes: timed once
    timer(first, torch.randn(4, 64, 8, 8))
    first.execution = "dense"
    timer(first, x)
    assert len(sessions) == 3  # another batch, another form: timed again
    assert timer(first, x, fresh=True) > 0 and timer(first, x, fresh=True) > 0
    assert len(sessions) == 4  # timed afresh twice on one session, kept for that


@needs_openvino
def test_openvino_timer_times_a_block_in_the_precision_asked_for():
    from gpconv.export import runtime_timer

    block = gpconv.GroupedPointwiseConv2d(64, 96, 16).eval().fold()
    assert runtime_timer("openvino", "f32", threads=1)(block, torch.randn(2, 64, 8, 8)) > 0


def test_tune_refuses_unknown_runtimes_and_forms_before_any_work(tmp_path, capsys):
    from gpconv.export import DeployError

    images = _real_images(8)
    model = _converted_model(images)
    for tune, form, message in [("tvm", "rule", "cannot tune for 'tvm'"), ("onnxruntime:bf16", "rule", "no precision"),
                                ("openvino:f16", "rule", "unknown OpenVINO precision"),
                                ("onnxruntime", "dense", "does not go with form")]:
        with pytest.raises(DeployError, match=message):
            gpconv.export_onnx(model, tmp_path / "x.onnx", images, tune=tune, form=form)
    assert not list(tmp_path.iterdir())
    for argv in (["--tune", "tvm"], ["--tune-batch", "4"]):
        assert main(["export", "mobilenet", *argv, "--output", str(tmp_path / "y.onnx")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cli_tune_prints_the_choice_and_records_the_batch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpconv.export.tuning, "runtime_timer", ranking_timer(prefers_dense))
    output = tmp_path / "m.onnx"
    assert main(["export", "mobilenet", "--channels-per-group", "16", "--image-size", "32", "--tune", "onnxruntime",
                 "--tune-batch", "3", "--verify-images", "4", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    recorded = json.loads(metadata(output)["gpconv.tune"])
    assert recorded["input_shape"] == [3, 3, 32, 32] and set(recorded["forms"].values()) >= {"dense"}
    assert "tuned for onnxruntime" in printed and "input 3x3x32x32" in printed and "dense" in printed


def test_real_onnxruntime_tuning_picks_one_of_each_blocks_forms(tmp_path):
    images = _real_images(8)
    model = _converted_model(images)
    result = gpconv.export_onnx(model, tmp_path / "t.onnx", images[:4], verify_input=images, tune="onnxruntime",
                                tune_threads=1)
    prepared = gpconv.prepare_for_inference(model, channels_last=False)
    blocks = {n: b for n, b in prepared.named_modules() if isinstance(b, FoldedGroupedPointwiseConv2d)}
    assert set(result.tuning["forms"]) == set(blocks)
    for name, form in result.tuning["forms"].items():
        assert form.split()[0] in blocks[name].executions


def test_a_model_without_grouped_blocks_exports_as_it_is_and_says_so(tmp_path, monkeypatch):
    from gpconv.export import tuning_summary

    monkeypatch.setattr(gpconv.export.tuning, "runtime_timer", None)  # nothing may be timed
    images = _real_images(8)
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    result = gpconv.export_onnx(dense, tmp_path / "dense.onnx", images[:4], verify_input=images, tune="onnxruntime")
    assert result.tuning["forms"] == {} and "no grouped blocks" in tuning_summary(result.tuning)
    assert json.loads(metadata(result.path)["gpconv.tune"]) == result.tuning
