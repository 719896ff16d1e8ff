"""Running exported files on the CPU: ONNX Runtime sessions (:func:`onnx_session`) and OpenVINO
(:func:`openvino_compile` in an explicit precision; :func:`openvino_chunked` for large batches in
cache-sized chunks, one stream per core: the fastest way measured on this project's CPU,
docs/performance.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..io import first_line
from .cpu import _warn_if_tuned_elsewhere
from .deploy import DeployError, require_deploy
from .files import TUNE_KEY, _check_input_shape

__all__ = ["onnx_session", "OPENVINO_PRECISIONS", "openvino_default_precision", "openvino_compile",
           "check_openvino_precision", "openvino_chunked"]


def onnx_session(model, threads: Optional[int] = None, *, spinning: bool = True, profile: Optional[str] = None):
    """An ONNX Runtime CPU session of ``model`` (a path or serialized bytes), all graph optimizations,
    ``threads`` intra-op threads (default: ONNX Runtime's). ``spinning=False`` stops its idle threads
    from busy-waiting after a run (they would take the CPU from whatever runs next, e.g. in a benchmark
    that alternates runtimes). ``profile``: ONNX Runtime's profiler on, its JSON file named with this
    prefix (``session.end_profiling()`` returns the path). A file tuned (``tune=``) on a CPU of another kind
    warns (one line: both CPUs, how to re-tune)."""
    ort = require_deploy("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's own kinds (InvalidProtobuf, Fail, NoSuchFile ...)
        raise DeployError(f"ONNX Runtime cannot load {_shown(model)}: {first_line(error)}") from None
    _warn_if_tuned_elsewhere(session.get_modelmeta().custom_metadata_map.get(TUNE_KEY), _shown(model))
    return session


def _shown(model) -> str:
    return "the exported model" if isinstance(model, bytes) else str(model)


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
    the result with a float32 NCHW array.

    Only the batch of ``input_shape`` may differ from the file's: a file :func:`export_onnx` wrote has
    static channels, height and width, and its Keras "same" padding is fixed for that size's parity, so
    OpenVINO would run another size with wrong outputs; :class:`DeployError` (one line) instead. A file
    tuned (``tune=``) on a CPU of another kind warns, as in :func:`onnx_session`."""
    ov = require_deploy("openvino")
    core = ov.Core()
    try:
        network = core.read_model(str(model))
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError for a missing or damaged file
        raise DeployError(f"OpenVINO cannot read {model}: {first_line(error)}") from None
    if network.has_rt_info(["framework", TUNE_KEY]):  # where OpenVINO keeps an ONNX file's metadata_props
        _warn_if_tuned_elsewhere(network.get_rt_info(["framework", TUNE_KEY]).astype(str), model)
    if input_shape is not None:
        _check_input_shape(model, [None if d.is_dynamic else d.get_length() for d in network.inputs[0].get_partial_shape()],
                           input_shape)
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
    image_shape = tuple(int(d) for d in image_shape)
    compiled = openvino_compile(model, (chunk, *image_shape), threads, precision, streams=streams)
    queue = ov.AsyncInferQueue(compiled, streams)
    results = {}
    queue.set_callback(lambda request, index: results.__setitem__(index, request.get_output_tensor(0).data.copy()))

    def run(batch):
        if tuple(batch.shape[1:]) != image_shape:
            raise DeployError(f"openvino_chunked was compiled for images of shape {image_shape}, got a batch of "
                              f"{tuple(batch.shape[1:])}")
        batch = np.asarray(batch, dtype=np.float32)
        for index, start in enumerate(range(0, len(batch), chunk)):
            part = batch[start:start + chunk]
            if len(part) < chunk:
                part = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
            queue.start_async([np.ascontiguousarray(part)], index)
        queue.wait_all()
        logits = np.concatenate([results.pop(index) for index in sorted(results)])
        return logits[:len(batch)]

    return run
