"""Tuning an export for the runtime that will run it (``export_onnx(..., tune=...)``, ``gpconv export
--tune onnxruntime|openvino[:precision]``, issue 24): each grouped block's inference form timed in that
runtime on the batch to deploy, the fastest kept, the choice recorded in the file's metadata."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..core.folded import FoldedGroupedPointwiseConv2d, choose_executions
from ..core.timing import _seconds
from .cpu import cpu_description
from .deploy import DeployError, _quiet_loggers, require_deploy
from .forms import _block_forms, _restore_forms, _set_every_block
from .runtimes import (OPENVINO_PRECISIONS, check_openvino_precision, onnx_session, openvino_compile,
                       openvino_default_precision)

__all__ = ["TUNE_RUNTIMES", "parse_tune", "runtime_timer", "tune_for_runtime", "tuning_summary", "torchscript_onnx",
           "modes_kept"]

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


@contextlib.contextmanager
def modes_kept(module: nn.Module):
    """Every submodule of ``module`` leaves in the training mode it came in. PyTorch's exporters switch
    the model to eval mode and afterwards call ``train(mode)`` with the *top* module's mode, which sets
    that one mode on every submodule: an eval-mode model inside a wrapper left in training mode (a fresh
    ``nn.Module`` is) would come out with its batch norms in training mode, and the next export of it
    would compute batch statistics."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


def torchscript_onnx(module: nn.Module, x: torch.Tensor, input_name: str = "x", output_name: Optional[str] = None,
                     dynamic_batch: bool = False, opset: Optional[int] = None) -> bytes:
    """``module`` as ONNX bytes through PyTorch's TorchScript-based exporter (milliseconds for one block,
    seconds for a network, where the torch.export-based one takes seconds to tens of seconds), exporter
    chatter silenced, constants folded; with ``dynamic_batch`` the first dimension stays free. Every
    submodule keeps its training mode (:func:`modes_kept`)."""
    outputs = None if output_name is None else [output_name]
    axes = {name: {0: "batch"} for name in [input_name, *(outputs or [])]} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _quiet_loggers(), contextlib.redirect_stdout(io.StringIO()), modes_kept(module):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=[input_name], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
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
        data, array = torchscript_onnx(module, x), x.detach().float().contiguous().numpy()
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
