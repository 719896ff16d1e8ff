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
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .core.executions import FOLDED_EXECUTIONS
from .core.inference import FoldedGroupedPointwiseConv2d, _seconds, choose_executions, prepare_for_inference
from .io import atomic_write, first_line

__all__ = ["DeployError", "ExportResult", "export_onnx", "quantize_onnx", "onnx_session", "onnx_form",
           "ONNX_FORMS", "require_deploy", "check_output", "openvino_compile", "openvino_default_precision",
           "OPENVINO_PRECISIONS", "openvino_chunked", "check_openvino_precision", "onnx_input_shape",
           "MIN_VERIFY_IMAGES", "cpu_description", "CPU_FEATURES", "TUNE_RUNTIMES", "TUNE_KEY", "parse_tune",
           "runtime_timer", "tune_for_runtime", "tuning_summary"]

# Written into every exported file (metadata_props): export_onnx only overwrites files that carry it.
GPCONV_MARK = "gpconv.export"
# The metadata key of a tuned export's choice (tune_for_runtime's record as JSON).
TUNE_KEY = "gpconv.tune"

# The forms :func:`onnx_form` can give the grouped blocks: ``"rule"`` is prepare_for_inference's choice
# without timing (dense for small blocks, else factored where there is one, super-grouped); the others
# are the folded executions (gpconv.core.executions): every block in that execution where it has it
# ("dense" falls back to "factored"), group factor 1.
# Timed in ONNX Runtime (benchmarks/runtimes.py --onnx-forms, docs/performance.md), none was clearly
# faster than "rule", which is the default.
ONNX_FORMS = ("rule",) + FOLDED_EXECUTIONS


# The /proc/cpuinfo flags that decide which CPU kernels the runtimes pick (oneDNN, MLAS, OpenVINO) and how
# fast grouped vs dense 1x1 convolutions run (docs/performance.md), with the names Intel's manuals give them.
CPU_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"),
                ("avx512_fp16", "AVX512-FP16"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This CPU's model name, core count and its matrix/vector features (:data:`CPU_FEATURES`), e.g.
    ``"Intel(R) Xeon(R) Processor @ 2.80GHz, 2 cores; AVX2, AVX-512, AVX512-VNNI; no AVX512-BF16, ..."``:
    printed with every timing table and recorded in a tuned export, since which form of a model is fastest
    depends on them. Without ``cpuinfo`` (not Linux) the model is ``platform.processor()`` and the features
    are "unknown"."""
    import platform

    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():  # the first processor's values (later blocks repeat the keys)
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags_line = fields.get("flags", fields.get("Features"))
    head = f"{model}, {os.cpu_count()} cores"
    if flags_line is None:
        return head + "; features unknown"
    flags = set(flags_line.split())
    present = [name for flag, name in CPU_FEATURES if flag in flags]
    absent = [name for flag, name in CPU_FEATURES if flag not in flags]
    return "; ".join([head] + [", ".join(present)] * bool(present) + [f"no {', '.join(absent)}"] * bool(absent))


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
    if form != "rule":
        _set_every_block(prepared, form)
    return prepared


def _set_every_block(prepared: nn.Module, form: str) -> None:
    """Every grouped block of ``prepared`` in the execution ``form`` where it has it ("dense" falls back to
    "factored", else "grouped"), group factor 1."""
    for block in prepared.modules():
        if isinstance(block, FoldedGroupedPointwiseConv2d):
            preference = (form, "factored") if form == "dense" else (form,)
            block.execution = next((e for e in preference if e in block.executions), "grouped")
            for layer in block.layers:
                layer.super_group(1)


def _block_forms(prepared: nn.Module) -> dict:
    """{block name: (execution, group factor of K, of L)} of every grouped block: what :func:`_restore_forms` sets."""
    return {name: (block.execution, *(layer.group_factor for layer in block.layers))
            for name, block in prepared.named_modules() if isinstance(block, FoldedGroupedPointwiseConv2d)}


def _restore_forms(prepared: nn.Module, forms: dict) -> None:
    blocks = dict(prepared.named_modules())
    for name, (execution, *factors) in forms.items():
        blocks[name].execution = execution
        for layer, factor in zip(blocks[name].layers, factors):
            layer.super_group(factor)


def onnx_session(model, threads: Optional[int] = None, *, spinning: bool = True, profile: Optional[str] = None):
    """An ONNX Runtime CPU session of ``model`` (a path or serialized bytes), all graph optimizations,
    ``threads`` intra-op threads (default: ONNX Runtime's). ``spinning=False`` stops its idle threads
    from busy-waiting after a run (they would take the CPU from whatever runs next, e.g. in a benchmark
    that alternates runtimes). ``profile``: ONNX Runtime's profiler on, its JSON file named with this
    prefix (``session.end_profiling()`` returns the path)."""
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
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's own kinds (InvalidProtobuf, Fail, NoSuchFile ...)
        raise DeployError(f"ONNX Runtime cannot load {_shown(model)}: {first_line(error)}") from None


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
    OpenVINO would run another size with wrong outputs; :class:`DeployError` (one line) instead."""
    ov = require_deploy("openvino")
    core = ov.Core()
    try:
        network = core.read_model(str(model))
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError for a missing or damaged file
        raise DeployError(f"OpenVINO cannot read {model}: {first_line(error)}") from None
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


def _check_input_shape(model, exported, asked) -> None:
    """:class:`DeployError` unless ``asked`` (a full input shape) fits ``exported`` (the file's input
    shape, None where a dimension is dynamic) in every dimension but the batch."""
    asked = tuple(int(d) for d in asked)
    fits = len(asked) == len(exported) and all(e is None or e == a for e, a in zip(exported[1:], asked[1:]))
    if not fits:
        shown = "x".join("?" if d is None else str(d) for d in exported[1:])
        raise DeployError(f"{model} takes inputs of shape (batch, {shown.replace('x', ', ')}), not "
                          f"{asked}: its padding is fixed for the exported size; export the model again at "
                          f"{'x'.join(map(str, asked[2:])) or 'that size'}")


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


# The runtimes ``export_onnx(..., tune=...)`` (``gpconv export --tune``) times the grouped blocks' forms in.
TUNE_RUNTIMES = ("onnxruntime", "openvino")


def parse_tune(text: str) -> tuple:
    """``"onnxruntime"``, ``"openvino"`` or ``"openvino:PRECISION"`` (one of :data:`OPENVINO_PRECISIONS`;
    default OpenVINO's own for this CPU) -> ``(runtime, precision or None)``; one-line :class:`DeployError`
    otherwise."""
    runtime, _, precision = str(text).partition(":")
    if runtime not in TUNE_RUNTIMES:
        raise DeployError(f"cannot tune for {text!r}: expected one of {', '.join(TUNE_RUNTIMES)} "
                          f"(openvino:PRECISION with PRECISION one of {', '.join(OPENVINO_PRECISIONS)})")
    if precision and runtime != "openvino":
        raise DeployError(f"{runtime} takes no precision (got {text!r}): it runs the file in float32")
    return runtime, (check_openvino_precision(precision) if precision else None)


def _form_key(module: nn.Module, x: torch.Tensor) -> tuple:
    """What a form's time depends on: its class, the executions and group factors in it, the shapes of its
    weights and of its input (not the weights' values); equal keys are timed once."""
    shapes = tuple((name, tuple(t.shape)) for name, t in module.state_dict().items())
    forms = tuple((getattr(m, "form", None), getattr(m, "group_factor", None), type(getattr(m, "act", None)).__name__,
                   getattr(m, "stride", None)) for m in module.modules())
    return type(module).__name__, forms, shapes, tuple(x.shape)


def _block_onnx(module: nn.Module, x: torch.Tensor) -> bytes:
    """``module`` alone as a small ONNX model at ``x``'s shape (the TorchScript exporter: a few
    milliseconds for one block, where the torch.export-based one takes seconds)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _quiet_loggers(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"])
    return buffer.getvalue()


def runtime_timer(runtime: str, precision: Optional[str] = None, threads: Optional[int] = None):
    """A timer for :func:`gpconv.core.inference.choose_executions`: ``timer(module, x)`` exports ``module``
    (a grouped block in one form, or one of its layers, or a whole model) alone at ``x``'s shape and
    returns the best of 3 runs in ``runtime`` (one of :data:`TUNE_RUNTIMES`; OpenVINO in ``precision``,
    default its own), ``threads`` threads. Forms of equal shapes are timed once (:func:`_form_key`);
    ``timer(module, x, fresh=True)`` times again (the compiled form is kept for that)."""
    if runtime not in TUNE_RUNTIMES:
        raise DeployError(f"cannot tune for {runtime!r}: expected one of {', '.join(TUNE_RUNTIMES)}")
    require_deploy("onnxruntime" if runtime == "onnxruntime" else "openvino")
    seconds, kept = {}, {}

    def runner(module: nn.Module, x: torch.Tensor):
        data, array = _block_onnx(module, x), x.detach().float().contiguous().numpy()
        if runtime == "onnxruntime":
            session = onnx_session(data, threads, spinning=False)
            return lambda: session.run(None, {"x": array})
        with tempfile.TemporaryDirectory(prefix="gpconv-tune-") as folder:
            path = Path(folder) / "block.onnx"
            path.write_bytes(data)
            request = openvino_compile(path, tuple(array.shape), threads, precision).create_infer_request()
        return lambda: request.infer([array])

    def timer(module: nn.Module, x: torch.Tensor, fresh: bool = False) -> float:
        key = _form_key(module, x)
        if fresh:
            if key not in kept:
                kept[key] = runner(module, x)
            return _seconds(kept[key])
        if key not in seconds:
            seconds[key] = _seconds(runner(module, x))
        return seconds[key]

    return timer


# Rounds of the whole-model check in tune_for_runtime (each the best of 3 runs; the median is compared).
WHOLE_MODEL_ROUNDS = 3


def tune_for_runtime(prepared: nn.Module, example_input: torch.Tensor, tune: str,
                     threads: Optional[int] = None) -> dict:
    """Give every grouped block of ``prepared`` (an NCHW :func:`onnx_form`) the form, of those it has
    (grouped with each group factor, factored, dense: a dense block costs what the dense model's layer
    costs), that runs fastest in the runtime ``tune`` names (:func:`parse_tune`) on ``example_input``'s
    shape (the batch to deploy).

    Blocks timed alone miss what the runtime does across them (layout reorders, fusions), so the whole
    model is then timed in three settings (alternating, :data:`WHOLE_MODEL_ROUNDS` rounds, medians), the
    fastest kept: ``"per block"`` (those choices), ``"rule"``
    (:func:`prepare_for_inference`'s untimed rule, the untuned export) and ``"dense"`` (every block dense
    where it can be: the dense model's cost). Returns what :func:`export_onnx` records in the file's
    metadata: ``{"runtime", "precision", "threads", "input_shape", "cpu", "model_seconds": {setting:
    seconds}, "kept": setting, "forms": {block name: form}}``."""
    runtime, precision = parse_tune(tune)
    if runtime == "openvino" and precision is None:
        precision = openvino_default_precision()
    version = require_deploy(runtime).__version__.split("-")[0]
    record = {"runtime": f"{runtime} {version}", "precision": precision or "float32", "threads": threads,
              "input_shape": list(example_input.shape), "cpu": cpu_description(), "model_seconds": {},
              "kept": "nothing to tune (no grouped blocks)", "forms": {}}
    if not _block_forms(prepared):
        return record
    timer, x = runtime_timer(runtime, precision, threads), example_input.contiguous()
    choose_executions(prepared, x, timer)
    settings = {"per block": _block_forms(prepared)}
    choose_executions(prepared, None)
    settings["rule"] = _block_forms(prepared)
    _set_every_block(prepared, "dense")
    settings["dense"] = _block_forms(prepared)
    samples = {name: [] for name in settings}
    for _ in range(WHOLE_MODEL_ROUNDS):  # alternating, so that a drift of the machine hits all three alike
        for name, forms in settings.items():
            _restore_forms(prepared, forms)
            samples[name].append(timer(prepared, x, fresh=True))
    seconds = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}  # medians
    kept = min(seconds, key=seconds.get)
    _restore_forms(prepared, settings[kept])
    forms = {name: block.form for name, block in prepared.named_modules()
             if isinstance(block, FoldedGroupedPointwiseConv2d)}
    return {**record, "model_seconds": seconds, "kept": kept, "forms": forms}


def tuning_summary(tuning: dict) -> str:
    """One line: what a tuned export chose, e.g. ``"tuned for onnxruntime 1.23.2 (float32, batch 16x3x224x224,
    2 threads) on CPU: 20 dense, 15 factored K1, 14 grouped K1 L1"``."""
    counts: dict = {}
    for form in tuning["forms"].values():
        counts[form] = counts.get(form, 0) + 1
    shape = "x".join(map(str, tuning["input_shape"]))
    threads = f"{tuning['threads']} threads" if tuning["threads"] else "the runtime's default threads"
    timed = ", ".join(f"{name} {1e3 * seconds:.1f} ms" for name, seconds in tuning["model_seconds"].items())
    head = f"tuned for {tuning['runtime']} ({tuning['precision']}, input {shape}, {threads}) on {tuning['cpu']}; "
    if not tuning["forms"]:
        return head + tuning["kept"]
    return (head + f"whole model: {timed}; kept {tuning['kept']}: "
            + ", ".join(f"{count} {form}" for form, count in sorted(counts.items(), key=lambda item: -item[1])))


# Fewer verification images than this prove nothing about a graph (export_onnx refuses them).
MIN_VERIFY_IMAGES = 4
# Outputs at most this many times the tolerance are "near zero": any graph would pass the check on them.
NEAR_ZERO_FACTOR = 100.0


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    max_difference: float  # max |ONNX Runtime - torch| over the verification images' outputs
    max_output: float  # max |torch output|: the scale the difference is to be read against
    images: int
    note: Optional[str] = None  # set when the check says little (outputs near zero)
    tuning: Optional[dict] = None  # with tune=: tune_for_runtime's record, also in the file's metadata (TUNE_KEY)


def check_output(path: Path, overwrite: bool = False) -> None:
    """The output rule for an exported file: refuse (one-line :class:`DeployError`) a path whose folder
    is missing, a folder, and an existing file unless ``overwrite`` (``--overwrite``), and even then a
    file that ``gpconv export`` did not write."""
    if not path.parent.is_dir():
        raise DeployError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise DeployError(f"cannot write {path}: it is a folder")
    if os.path.lexists(path):
        if not _written_by_gpconv(path):
            raise DeployError(f"{path} exists and was not written by gpconv export; choose another path")
        if not overwrite:
            raise DeployError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                              "another path")


def _write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda out: out.write(data))  # the one atomic writer (temporary file, then rename)


def _written_by_gpconv(path: Path) -> bool:
    onnx = require_deploy("onnx")
    if path.is_symlink():
        return False
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file at all
        return False
    return any(prop.key == GPCONV_MARK for prop in proto.metadata_props)


class _Logits(nn.Module):
    """``model`` whose output is reduced to one tensor: ``pick`` is ``("tensor",)``, ``("index", i)``,
    ``("key", name)`` or ``("attribute", name)``."""

    def __init__(self, model: nn.Module, pick: tuple):
        super().__init__()
        self.model, self.pick = model, pick

    def forward(self, images):
        output = self.model(images)
        kind = self.pick[0]
        if kind in ("index", "key"):
            return output[self.pick[1]]
        return getattr(output, self.pick[1]) if kind == "attribute" else output


def _choose_output(output, name: Optional[str]) -> tuple:
    """How :class:`_Logits` picks the exported tensor from ``output`` (what the model returned): the
    tensor itself, ``name`` (a key or attribute), ``logits`` (transformers' ``ModelOutput``, a dict),
    or the first element of a tuple or list; :class:`DeployError` (one line) otherwise."""
    from collections.abc import Mapping

    kind = type(output).__name__
    if name is not None:
        if isinstance(output, Mapping) and name in output:
            return ("key", name)
        if not isinstance(output, (torch.Tensor, Mapping)) and hasattr(output, name):
            return ("attribute", name)
        known = ", ".join(map(str, output.keys())) if isinstance(output, Mapping) else "none by that name"
        raise DeployError(f"the model's output ({kind}) has no output named {name!r} (it has: {known})")
    if isinstance(output, torch.Tensor):
        return ("tensor",)
    if isinstance(output, Mapping):
        if "logits" in output:
            return ("key", "logits")
        raise DeployError(f"the model returns a {kind} without 'logits' (keys: {', '.join(map(str, output))}); "
                          "name the output to export: export_onnx(..., output=KEY)")
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return ("attribute", "logits")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return ("index", 0)
    raise DeployError(f"the model returns a {kind}, not a tensor, a tuple of tensors or an output with logits; "
                      "export_onnx exports one tensor")


def _check_dtypes(model: nn.Module, images: torch.Tensor, what: str) -> torch.Tensor:
    """``images`` as float32 on the CPU; :class:`DeployError` (one line) when the model has floating
    parameters or buffers other than float32 (ONNX Runtime and OpenVINO do not run float64 and bfloat16
    graphs on the CPU as exported), or when ``images`` are not floating point (uint8 images: divide by
    255 first)."""
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in [*model.parameters(), *model.buffers()]
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        raise DeployError(f"export_onnx exports float32 models; this one has {', '.join(dtypes)} weights: call "
                          "model.float() first")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() < 2:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise DeployError(f"{what} must be a float batch of images (N, C, H, W), got {kind}"
                          + (f" of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else ""))
    return images.detach().cpu().float()


def _export_proto(form: nn.Module, example_input: torch.Tensor, opset: Optional[int], props: Optional[dict] = None):
    """The ONNX ModelProto of ``form`` with a dynamic batch dimension (exporter chatter silenced), gpconv's
    mark and ``props`` in its metadata."""
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
    onnx.helper.set_model_props(proto, {GPCONV_MARK: "1", **(props or {})})
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
                tolerance: float = 1e-4, opset: Optional[int] = None, form: str = "rule",
                output: Optional[str] = None, overwrite: bool = False, tune: Optional[str] = None,
                tune_threads: Optional[int] = None) -> ExportResult:
    """Export ``model`` (any gpconv model, or one put through :func:`gpconv.convert`) to the ONNX file
    ``path``, with a dynamic batch dimension; the input is named ``images``, the output ``logits``.

    ``form``: how grouped blocks are exported (:data:`ONNX_FORMS`). ``example_input``: a float batch
    of the input size (``(N, C, H, W)``); the file takes that channel count, height and width only.

    ``tune`` (``"onnxruntime"``, ``"openvino"`` or ``"openvino:f32"``/``"openvino:bf16"``): instead of
    ``form``, each grouped block gets the form that runs fastest *in that runtime* on this CPU at
    ``example_input``'s shape (its batch is the batch to deploy), ``tune_threads`` threads
    (:func:`tune_for_runtime`); a dense-folded block costs what the dense model's layer costs, so the
    choice is never slower than the dense model beyond timing noise. The choice (runtime, precision,
    shape, threads, CPU, each block's form) is in ``result.tuning`` and, as JSON, in the file's metadata
    under ``"gpconv.tune"``; a file tuned on one CPU kind may not be the fastest on another.
    ``verify_input`` (default: ``example_input``; at least :data:`MIN_VERIFY_IMAGES` images) are the
    images ONNX Runtime runs before anything is written: the largest difference from the eval-mode
    torch model must be at most ``tolerance`` (times the largest output magnitude where that exceeds
    1: float32 rounding grows with the values), else :class:`DeployError` and no file. Use real
    images and a trained model: a fresh model's logits are near zero, which any graph matches; the
    result's ``note`` (and a warning) says so when the outputs stay within ``100 * tolerance``.

    A model that returns more than a tensor (transformers' ``ModelOutput``, a dict, a tuple) is
    exported with one output: ``output`` (a key or attribute name) when given, else its ``logits``,
    else the first element of a tuple. The model must be float32 (float64, float16 and bfloat16
    weights are refused: ``model.float()``). These checks run before the export (one-line
    :class:`DeployError`). The file is written atomically; an existing file is refused unless
    ``overwrite`` (and even then one ``export_onnx`` did not write). ``model`` itself is left unchanged.
    """
    path = Path(path)
    if not tolerance > 0:
        raise DeployError(f"tolerance must be a number > 0, got {tolerance!r}")
    check_output(path, overwrite)
    example_input = _check_dtypes(model, example_input, "example_input")
    images = example_input if verify_input is None else _check_dtypes(model, verify_input, "verify_input")
    if len(example_input) == 0 or len(images) < MIN_VERIFY_IMAGES:
        raise DeployError(f"verification needs at least {MIN_VERIFY_IMAGES} images, got {len(images)} (verify_input, "
                          "else example_input); nothing written")
    if tuple(images.shape[1:]) != tuple(example_input.shape[1:]):
        raise DeployError(f"verify_input has images of shape {tuple(images.shape[1:])}, example_input of "
                          f"{tuple(example_input.shape[1:])}: the file takes one size")
    reference = copy.deepcopy(model).cpu().eval()
    try:
        with torch.inference_mode():
            returned = reference(example_input[:1])
    except Exception as error:  # noqa: BLE001 - whatever the model raises on a wrong input: one line
        raise DeployError(f"the model cannot run example_input of shape {tuple(example_input.shape)}: "
                          f"{first_line(error)}") from None
    if tune is not None:
        parse_tune(tune)  # a one-line error before any work
        if form != "rule":
            raise DeployError(f"tune picks each block's form: it does not go with form={form!r}")
    pick = _choose_output(returned, output)
    selected = _Logits(reference, pick)
    with torch.inference_mode():
        logits = selected(example_input[:1])
    if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.dim() < 1 or len(logits) != 1:
        shown = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DeployError(f"the exported output must be a float32 tensor with the batch first, got {shown}")
    exported = onnx_form(reference, form)
    tuning = None if tune is None else tune_for_runtime(exported, example_input, tune, tune_threads)
    proto = _export_proto(_Logits(exported, pick), example_input, opset,
                          None if tuning is None else {TUNE_KEY: json.dumps(tuning)})
    serialized = proto.SerializeToString()
    worst, scale = _verify(serialized, selected, images, tolerance)
    _write_bytes(path, serialized)
    note = None
    if scale <= NEAR_ZERO_FACTOR * tolerance:
        note = (f"the torch outputs are at most {scale:.2g}, near zero: any graph passes a check against them; "
                "verify a trained model (or one with batch norms set on real images) on real images")
        warnings.warn(note, stacklevel=2)
    return ExportResult(path, worst, scale, len(images), note, tuning)


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a float image tensor, in batches."""

    def __init__(self, images: torch.Tensor, batch_size: int):
        self._batches = iter([images[start:start + batch_size].float().contiguous().numpy()
                              for start in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def onnx_input_shape(path) -> tuple:
    """The input shape of the ONNX file ``path``: a tuple with None for each dynamic dimension;
    :class:`DeployError` (one line) when ``path`` is not an ONNX file."""
    onnx = require_deploy("onnx")
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        dims = proto.graph.input[0].type.tensor_type.shape.dim
    except Exception as error:  # onnx raises DecodeError, IndexError ... for a damaged file
        raise DeployError(f"{path} is not an ONNX file ({type(error).__name__})") from None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def quantize_onnx(source, path, calibration_images: torch.Tensor, *, batch_size: int = 32,
                  per_channel: bool = True, overwrite: bool = False) -> Path:
    """Write a static int8 copy of the fp32 ONNX file ``source`` (from :func:`export_onnx`) to ``path``.

    Activations are calibrated (min/max) on ``calibration_images`` (float ``(N, C, H, W)`` of the
    file's input size; a few hundred training images are enough, never test images); weights are
    int8 per output channel, activations uint8, QDQ format, which ONNX Runtime runs as integer
    convolutions and OpenVINO reads as well. Written atomically, with the same output rule as
    :func:`export_onnx` (``overwrite``); ``path`` may not be ``source``. One-line
    :class:`DeployError` before any work otherwise.
    """
    require_deploy("onnx")
    quantization = require_deploy("onnxruntime.quantization")
    source, path = Path(source), Path(path)
    if path.resolve() == source.resolve():
        raise DeployError(f"the int8 file {path} would replace its source: choose another path")
    shape = onnx_input_shape(source)
    check_output(path, overwrite)
    if not isinstance(calibration_images, torch.Tensor) or not calibration_images.is_floating_point():
        raise DeployError("int8 calibration needs float images (N, C, H, W) scaled as the model takes them")
    if len(calibration_images) == 0:
        raise DeployError("int8 calibration needs at least one image")
    _check_input_shape(source, shape, tuple(calibration_images.shape))
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
