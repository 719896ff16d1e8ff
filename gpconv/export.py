"""Export gpconv models to ONNX for ONNX Runtime and OpenVINO, and quantize them to int8.

``export_onnx(model, path, example_input)`` exports any model gpconv builds or converts, with a
dynamic batch dimension, through PyTorch's ``torch.export``-based ONNX exporter (the legacy
TorchScript exporter cannot export a convolution whose weight is computed in ``forward``). The
exported graph is the inference form of :func:`~gpconv.core.inference.prepare_for_inference` (batch norms
folded, grouped blocks folded, Keras padding without copies) in NCHW, each grouped block in the form
chosen by :func:`onnx_form`. Before the file is written, ONNX Runtime
runs it on real images and its outputs must equal the eval-mode torch model's within ``tolerance``
(relative to the largest output where that exceeds 1).

``quantize_onnx`` makes a static int8 model (ONNX Runtime's post-training quantization, QDQ format,
per-channel weights) calibrated on training images.

``openvino_compile`` compiles an exported file with OpenVINO for the CPU, in OpenVINO's default
precision (bf16 on CPUs with AVX512-BF16 or AMX: :func:`openvino_default_precision`) or the one asked
for; ``openvino_chunked`` runs large batches through it in cache-sized chunks, one stream per core
(the fastest way measured on this project's CPU, docs/performance.md).

Needs the ``deploy`` extra (``pip install 'gpconv[deploy]'``: onnx, onnxscript, onnxruntime,
openvino); without it these functions raise :class:`DeployError` with that hint, and the rest of
gpconv does not depend on them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .core.executions import FOLDED_EXECUTIONS
from .core.inference import FoldedGroupedPointwiseConv2d, prepare_for_inference

__all__ = ["DeployError", "ExportResult", "export_onnx", "quantize_onnx", "onnx_session", "onnx_form",
           "ONNX_FORMS", "require_deploy", "check_output", "openvino_compile", "openvino_default_precision",
           "OPENVINO_PRECISIONS", "openvino_chunked", "check_openvino_precision"]

# Written into every exported file (metadata_props): export_onnx only overwrites files that carry it.
GPCONV_MARK = "gpconv.export"

# The forms :func:`onnx_form` can give the grouped blocks: ``"rule"`` is prepare_for_inference's choice
# without timing (dense for small blocks, else factored where there is one, super-grouped); the others
# are the folded executions (gpconv.core.executions): every block in that execution where it has it
# ("dense" falls back to "factored"), group factor 1.
# Timed in ONNX Runtime (benchmarks/runtimes.py --onnx-forms, docs/performance.md), none was clearly
# faster than "rule", which is the default.
ONNX_FORMS = ("rule",) + FOLDED_EXECUTIONS


class DeployError(ValueError):
    """Export or quantization cannot be done (one-line message)."""


def require_deploy(module: str):
    """Import ``module`` (onnx, onnxruntime, openvino, ...) or raise :class:`DeployError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DeployError(f"{module} is not installed: ONNX export and runtimes need the deploy extra "
                          "(pip install 'gpconv[deploy]')") from None


def onnx_form(model: nn.Module, form: str = "rule") -> nn.Module:
    """The eval-mode, NCHW inference copy of ``model`` that :func:`export_onnx` exports, its grouped
    blocks in ``form`` (one of :data:`ONNX_FORMS`)."""
    if form not in ONNX_FORMS:
        raise DeployError(f"unknown form {form!r}; expected one of: {', '.join(ONNX_FORMS)}")
    prepared = prepare_for_inference(model, channels_last=False)
    if form == "rule":
        return prepared
    for block in prepared.modules():
        if isinstance(block, FoldedGroupedPointwiseConv2d):
            preference = (form, "factored") if form == "dense" else (form,)
            block.execution = next((e for e in preference if e in block.executions), "grouped")
            for layer in block.layers:
                layer.super_group(1)
    return prepared


def onnx_session(model, threads: Optional[int] = None, *, spinning: bool = True):
    """An ONNX Runtime CPU session of ``model`` (a path or serialized bytes), all graph optimizations,
    ``threads`` intra-op threads (default: ONNX Runtime's). ``spinning=False`` stops its idle threads
    from busy-waiting after a run (they would take the CPU from whatever runs next, e.g. in a benchmark
    that alternates runtimes)."""
    ort = require_deploy("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


OPENVINO_PRECISIONS = ("f32", "bf16")


def openvino_default_precision() -> str:
    """The precision OpenVINO's CPU plugin computes in when none is asked for: ``"bf16"`` on a CPU with
    AVX512-BF16 or AMX (OpenVINO's default there; the logits then differ from fp32 visibly, which
    ``gpconv export --openvino`` measures), else ``"f32"``."""
    ov = require_deploy("openvino")
    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return "bf16" if "bf" in str(hint).lower() else "f32"


def openvino_compile(model, input_shape: Optional[tuple] = None, threads: Optional[int] = None,
                     precision: Optional[str] = None, *, profile: bool = False, streams: Optional[int] = None):
    """``model`` (an ONNX file) compiled by OpenVINO for the CPU: reshaped to the static ``input_shape``
    when given (else the file's dynamic batch), ``threads`` inference threads, ``precision`` one of
    :data:`OPENVINO_PRECISIONS` (default: :func:`openvino_default_precision`), ``profile``: per-node
    profiling counters on; latency hint, or throughput hint with ``streams`` streams when given. Call
    the result with a float32 NCHW array."""
    ov = require_deploy("openvino")
    core = ov.Core()
    network = core.read_model(str(model))
    if input_shape is not None:
        network.reshape({network.inputs[0].any_name: list(input_shape)})
    config = {"PERFORMANCE_HINT": "LATENCY" if streams is None else "THROUGHPUT", "PERF_COUNT": profile}
    if streams is not None:
        config["NUM_STREAMS"] = streams
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = check_openvino_precision(precision)
    return core.compile_model(network, "CPU", config)


def check_openvino_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`OPENVINO_PRECISIONS`, else a one-line :class:`DeployError`."""
    if precision not in OPENVINO_PRECISIONS:
        raise DeployError(f"unknown OpenVINO precision {precision!r}; expected one of: " + ", ".join(OPENVINO_PRECISIONS))
    return precision


def openvino_chunked(model, chunk: int, image_shape: tuple, threads: Optional[int] = None,
                     precision: Optional[str] = None, streams: int = 2):
    """A callable that runs a float32 NCHW batch of any size through OpenVINO in chunks of ``chunk``
    images, ``streams`` chunks at a time (OpenVINO's throughput mode, the ``threads`` shared among the
    streams), and returns the logits in order. A chunk's activations stay in the cores' caches where a
    whole large batch's do not, and that is what makes the grouped layers fast: they are bound by memory
    traffic (docs/performance.md, "Chunks and streams"). ``image_shape``: (channels, height, width);
    ``model``: an ONNX file; the last chunk is padded with zeros and the padding dropped."""
    import numpy as np

    ov = require_deploy("openvino")
    compiled = openvino_compile(model, (chunk, *image_shape), threads, precision, streams=streams)
    queue = ov.AsyncInferQueue(compiled, streams)
    results = {}
    queue.set_callback(lambda request, index: results.__setitem__(index, request.get_output_tensor(0).data.copy()))

    def run(batch):
        for index, start in enumerate(range(0, len(batch), chunk)):
            part = batch[start:start + chunk]
            if len(part) < chunk:
                part = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
            queue.start_async([np.ascontiguousarray(part)], index)
        queue.wait_all()
        logits = np.concatenate([results.pop(index) for index in sorted(results)])
        return logits[:len(batch)]

    return run


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    max_difference: float  # max |ONNX Runtime - torch| over the verification images' outputs
    max_output: float  # max |torch output|: the scale the difference is to be read against
    images: int


def check_output(path: Path) -> None:
    """Refuse a path whose folder is missing, or that holds a file gpconv did not export."""
    if not path.parent.is_dir():
        raise DeployError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise DeployError(f"cannot write {path}: it is a folder")
    if path.exists() and not _written_by_gpconv(path):
        raise DeployError(f"{path} exists and was not written by gpconv export; choose another path")


def _write_bytes(path: Path, data: bytes) -> Path:
    from .io import atomic_write  # the one atomic writer (temporary file, then os.replace)

    return atomic_write(path, lambda out: out.write(data))


def _written_by_gpconv(path: Path) -> bool:
    onnx = require_deploy("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file at all
        return False
    return any(prop.key == GPCONV_MARK for prop in proto.metadata_props)


def _export_proto(form: nn.Module, example_input: torch.Tensor, opset: Optional[int]):
    """The ONNX ModelProto of ``form`` with a dynamic batch dimension (exporter chatter silenced)."""
    require_deploy("onnxscript")
    onnx = require_deploy("onnx")
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()  # batch 2: stays dynamic
    batch = torch.export.Dim("batch", min=1)
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(form, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=opset, optimize=True,
                                    verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {GPCONV_MARK: "1"})
    return proto


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs warnings per node (torchvision ops, attribute types): hide them meanwhile."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _verify(serialized: bytes, model: nn.Module, images: torch.Tensor, tolerance: float, batch_size: int = 64):
    """(max |difference|, max |torch output|) of ONNX Runtime vs ``model`` in eval mode on ``images``;
    :class:`DeployError` when the difference exceeds ``tolerance * max(1, max |torch output|)``."""
    session = onnx_session(serialized)
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].float().contiguous()
            expected = model(batch).float().numpy()
            got = session.run(None, {"images": batch.numpy()})[0]
            worst = max(worst, float(abs(got - expected).max()))  # numpy arrays (the deploy extra has numpy)
            scale = max(scale, float(abs(expected).max()))
    allowed = tolerance * max(1.0, scale)  # float32 rounding grows with the outputs: relative past 1
    if not worst <= allowed:  # NaN fails too
        raise DeployError(f"the exported model differs from torch by {worst:.3g} (> {allowed:.3g}, outputs up to "
                          f"{scale:.3g}) on {len(images)} images; nothing written")
    return worst, scale


def export_onnx(model: nn.Module, path, example_input: torch.Tensor, *, verify_input: Optional[torch.Tensor] = None,
                tolerance: float = 1e-4, opset: Optional[int] = None,
                form: str = "rule") -> ExportResult:
    """Export ``model`` (any gpconv model, or one put through :func:`gpconv.convert`) to the ONNX file
    ``path``, with a dynamic batch dimension; the input is named ``images``, the output ``logits``.

    ``form``: how grouped blocks are exported (:data:`ONNX_FORMS`). ``example_input``: a float batch
    of the input size (``(N, C, H, W)``). ``verify_input`` (default: ``example_input``) are the
    images ONNX Runtime runs before anything is written: the largest difference from the eval-mode
    torch model must be at most ``tolerance`` (times the largest output magnitude where that exceeds
    1: float32 rounding grows with the values), else :class:`DeployError` and no file. Use real
    images and a trained model: a fresh model's logits are near zero, which any graph matches. The
    file is written atomically; an existing file is replaced only if an earlier ``export_onnx``
    wrote it. ``model`` itself is left unchanged.
    """
    path = Path(path)
    check_output(path)
    reference = copy.deepcopy(model).eval()
    proto = _export_proto(onnx_form(reference, form), example_input, opset)
    serialized = proto.SerializeToString()
    images = example_input if verify_input is None else verify_input
    worst, scale = _verify(serialized, reference, images, tolerance)
    _write_bytes(path, serialized)
    return ExportResult(path, worst, scale, len(images))


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a float image tensor, in batches."""

    def __init__(self, images: torch.Tensor, batch_size: int):
        self._batches = iter([images[start:start + batch_size].float().contiguous().numpy()
                              for start in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def quantize_onnx(source, path, calibration_images: torch.Tensor, *, batch_size: int = 32,
                  per_channel: bool = True) -> Path:
    """Write a static int8 copy of the fp32 ONNX file ``source`` (from :func:`export_onnx`) to ``path``.

    Activations are calibrated (min/max) on ``calibration_images`` (a few hundred training images are
    enough); weights are int8 per output channel, activations uint8, QDQ format, which ONNX Runtime
    runs as integer convolutions and OpenVINO reads as well. Written atomically, with the same
    overwrite rule as :func:`export_onnx`.
    """
    require_deploy("onnx")
    quantization = require_deploy("onnxruntime.quantization")
    path = Path(path)
    check_output(path)
    if len(calibration_images) == 0:
        raise DeployError("int8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gpconv-int8-") as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        with warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")
            quantization.shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantization.quantize_static(str(prepared), str(quantized), _Calibration(calibration_images, batch_size),
                                         quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
                                         activation_type=quantization.QuantType.QUInt8,
                                         weight_type=quantization.QuantType.QInt8)
        data = quantized.read_bytes()
    onnx = require_deploy("onnx")
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, {GPCONV_MARK: "int8"})
    return _write_bytes(path, proto.SerializeToString())
