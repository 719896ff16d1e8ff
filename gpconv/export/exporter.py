"""``export_onnx``: a model to an ONNX file with a dynamic batch, verified against torch in ONNX Runtime
before anything is written (see :mod:`gpconv.export`)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..io import first_line
from .deploy import DeployError, _quiet_loggers, require_deploy
from .files import EXPORTER_KEY, GPCONV_MARK, TUNE_KEY, _write_bytes, check_output
from .forms import onnx_form
from .runtimes import onnx_session
from .tuning import modes_kept, parse_tune, torchscript_onnx, tune_for_runtime

__all__ = ["MIN_VERIFY_IMAGES", "ExportResult", "export_onnx"]

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
    exporter: str = "dynamo"  # the PyTorch exporter that wrote the file: "torchscript" or "dynamo" (EXPORTER_KEY)


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


def _export_proto(form: nn.Module, example_input: torch.Tensor, opset: Optional[int], props: Optional[dict] = None,
                  dynamo: Optional[bool] = None):
    """The ONNX ModelProto of ``form`` with a dynamic batch dimension (exporter chatter silenced), gpconv's
    mark, the exporter used (``"gpconv.exporter"``) and ``props`` in its metadata.

    ``dynamo=None``: PyTorch's TorchScript-based exporter (a few seconds for a whole network), and where it
    fails the ``torch.export``-based one (tens of seconds; the only one once PyTorch removes the other);
    ``True`` / ``False``: only that one. :func:`export_onnx` verifies either file before writing it."""
    require_deploy("onnxscript")
    onnx = require_deploy("onnx")
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()  # batch 2: stays dynamic
    proto = None
    if dynamo is not True:
        try:
            proto, exporter = onnx.load_from_string(_torchscript_bytes(form, example, opset)), "torchscript"
        except Exception as error:  # noqa: BLE001 - any failure of the legacy exporter: try the other one
            if dynamo is False:
                raise DeployError(f"the TorchScript-based ONNX exporter failed: {first_line(error)}") from None
    if proto is None:
        proto, exporter = _dynamo_proto(form, example, opset), "dynamo"
    onnx.helper.set_model_props(proto, {GPCONV_MARK: "1", EXPORTER_KEY: exporter, **(props or {})})
    return proto


def _exporter(proto) -> str:
    """The PyTorch exporter that wrote ``proto`` (its ``EXPORTER_KEY`` metadata)."""
    return {prop.key: prop.value for prop in proto.metadata_props}[EXPORTER_KEY]


def _torchscript_bytes(form: nn.Module, example: torch.Tensor, opset: Optional[int]) -> bytes:
    """``form`` through the TorchScript-based exporter, batch dimension dynamic, constants folded."""
    return torchscript_onnx(form, example, "images", "logits", dynamic_batch=True, opset=opset)


def _dynamo_proto(form: nn.Module, example: torch.Tensor, opset: Optional[int]):
    """``form`` through the ``torch.export``-based exporter, batch dimension dynamic, graph optimised."""
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_loggers(), modes_kept(form):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(form, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=opset, optimize=True,
                                    verbose=False)
    return program.model_proto


def _run(session, batch: torch.Tensor):
    """ONNX Runtime's output for ``batch``; :class:`DeployError` (one line) when the file fails on it."""
    try:
        return session.run(None, {"images": batch.numpy()})[0]
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors have no common public base
        raise DeployError(f"the exported model fails in ONNX Runtime on a batch of {len(batch)}: "
                          f"{first_line(error)}; nothing written") from None


def _verify(serialized: bytes, model: nn.Module, images: torch.Tensor, tolerance: float, batch_size: int = 64):
    """(max |difference|, max |torch output|) of ONNX Runtime vs ``model`` in eval mode on ``images``;
    :class:`DeployError` when the difference exceeds ``tolerance * max(1, max |torch output|)``."""
    session = onnx_session(serialized)
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        # one image alone first: the file was traced at batch 2, and a batch size baked into it must fail here
        for batch in [images[:1], *images.split(batch_size)]:
            batch = batch.float().contiguous()
            expected = model(batch).float().numpy()
            got = _run(session, batch)
            if got.shape != expected.shape:
                raise DeployError(f"the exported model returns shape {got.shape} where torch returns "
                                  f"{expected.shape} (batch {len(batch)}); nothing written")
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
                tune_threads: Optional[int] = None, dynamo: Optional[bool] = None) -> ExportResult:
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
    under ``"gpconv.tune"``; a file tuned on one CPU kind may not be the fastest on another, and
    :func:`~gpconv.export.onnx_session` and :func:`~gpconv.export.openvino_compile` warn when they load it
    on a CPU of another model or features.
    ``dynamo``: which PyTorch exporter writes the file: ``None`` (default) the TorchScript-based one
    (seconds), and where it fails or its file fails the check below, the ``torch.export``-based one (tens
    of seconds for a whole network; PyTorch's default, and the only one once the other is removed);
    ``True`` or ``False``: only that one.
    The file is verified the same way whichever wrote it; ``result.exporter`` and the metadata key
    ``"gpconv.exporter"`` name it.
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
    props = None if tuning is None else {TUNE_KEY: json.dumps(tuning)}
    proto = _export_proto(_Logits(exported, pick), example_input, opset, props, dynamo)
    try:
        worst, scale = _verify(proto.SerializeToString(), selected, images, tolerance)
    except DeployError:
        if dynamo is not None or _exporter(proto) == "dynamo":
            raise
        # the TorchScript-based exporter wrote a graph that fails the check: the other exporter's, checked alike
        proto = _export_proto(_Logits(exported, pick), example_input, opset, props, True)
        worst, scale = _verify(proto.SerializeToString(), selected, images, tolerance)
    serialized = proto.SerializeToString()
    _write_bytes(path, serialized)
    note = None
    if scale <= NEAR_ZERO_FACTOR * tolerance:
        note = (f"the torch outputs are at most {scale:.2g}, near zero: any graph passes a check against them; "
                "verify a trained model (or one with batch norms set on real images) on real images")
        warnings.warn(note, stacklevel=2)
    return ExportResult(path, worst, scale, len(images), note, tuning, _exporter(proto))
