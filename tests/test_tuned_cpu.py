"""A file exported with tune= records the CPU it was tuned on (issue 24); gpconv's runtime helpers that load it
(onnx_session, openvino_compile) on a CPU of another kind (model or features; the core count aside) say so in one
warning line with how to re-tune, as a fleet of mixed CPUs needs. The other CPU is simulated by editing the file's
metadata."""

import json
import warnings

import pytest
import torch
from torch import nn

import gpconv
from test_export import _real_images, needs_deploy, needs_openvino

pytestmark = needs_deploy

OTHER_CPU = "AMD EPYC 7B13, 64 cores; AVX2, AVX-512; no AVX512-VNNI, AVX512-BF16, AVX512-FP16, AMX-BF16, AMX-INT8"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A small model exported tuned for ONNX Runtime on this CPU (no grouped blocks: nothing is timed)."""
    images = _real_images(8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    path = tmp_path_factory.mktemp("tuned") / "tuned.onnx"
    gpconv.export_onnx(model.eval(), path, images[:4], verify_input=images, tune="onnxruntime")
    return path


def metadata(path) -> dict:
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}


def edited(source, folder, record=True, **changes):
    """A copy of the tuned file ``source`` whose tuning record has ``changes``; ``record=False``: none."""
    import onnx

    from gpconv.export import TUNE_KEY

    proto = onnx.load(str(source))
    props = {prop.key: prop.value for prop in proto.metadata_props}
    recorded = json.loads(props.pop(TUNE_KEY))
    if record:
        props[TUNE_KEY] = json.dumps({**recorded, **changes})
    onnx.helper.set_model_props(proto, props)
    path = folder / "edited.onnx"
    onnx.save(proto, str(path))
    return path


def warned(load, path) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(path)
    return caught


def test_the_tuned_file_records_this_cpu_and_loads_here_quietly(tuned, tmp_path):
    from gpconv.export import TUNE_KEY, cpu_description, onnx_session

    assert json.loads(metadata(tuned)[TUNE_KEY])["cpu"] == cpu_description()
    assert warned(onnx_session, tuned) == []
    assert warned(onnx_session, edited(tuned, tmp_path, record=False)) == []  # an untuned file: nothing to say


def test_onnx_runtime_warns_in_one_line_on_another_cpu(tuned, tmp_path):
    from gpconv.export import cpu_description, onnx_session

    path = edited(tuned, tmp_path, cpu=OTHER_CPU)
    caught = warned(onnx_session, path)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    message = str(caught[0].message)
    assert "\n" not in message and message.startswith(f"{path} was tuned for onnxruntime on another CPU ({OTHER_CPU})")
    assert f"this one is {cpu_description()}" in message and "--tune onnxruntime " in message
    with pytest.warns(UserWarning, match="another CPU"):
        session = onnx_session(path)
    assert session.run(None, {"images": _real_images(4).numpy()})[0].shape == (4, 10)  # a warning, not a refusal


def test_the_same_cpu_with_other_cores_does_not_warn(tuned, tmp_path):
    from gpconv.export import cpu_description, onnx_session

    head, _, features = cpu_description().partition("; ")
    other_cores = f"{head.rpartition(', ')[0]}, 512 cores; {features}"
    assert warned(onnx_session, edited(tuned, tmp_path, cpu=other_cores)) == []
    assert len(warned(onnx_session, edited(tuned, tmp_path, cpu=other_cores.replace("; ", "; AMX-BF16, ", 1)))) == 1


@needs_openvino
def test_openvino_warns_with_the_precision_to_retune_in(tuned, tmp_path):
    from gpconv.export import openvino_compile

    path = edited(tuned, tmp_path, cpu=OTHER_CPU, runtime="openvino 2025.3.0", precision="bf16")
    caught = warned(lambda p: openvino_compile(p, precision="f32"), path)
    assert len(caught) == 1 and "tuned for openvino on another CPU" in str(caught[0].message)
    assert "--tune openvino:bf16 " in str(caught[0].message)
    assert warned(lambda p: openvino_compile(p, precision="f32"), tuned) == []
