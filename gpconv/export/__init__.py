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

The package by responsibility: :mod:`~gpconv.export.exporter` (``export_onnx`` and its checks),
:mod:`~gpconv.export.forms` (the exported inference form), :mod:`~gpconv.export.files` (the output
rule, gpconv's metadata mark, a file's input shape), :mod:`~gpconv.export.runtimes` (ONNX Runtime and
OpenVINO), :mod:`~gpconv.export.quantize` (int8), :mod:`~gpconv.export.tuning` (``tune=``, issue 24),
:mod:`~gpconv.export.cpu` (``cpu_description``) and :mod:`~gpconv.export.deploy` (the extra and
:class:`DeployError`). Every public name is importable from ``gpconv.export``.
"""

from .cpu import CPU_FEATURES, cpu_description
from .deploy import DeployError, require_deploy
from .exporter import MIN_VERIFY_IMAGES, NEAR_ZERO_FACTOR, ExportResult, export_onnx  # noqa: F401
from .files import GPCONV_MARK, TUNE_KEY, check_output, onnx_input_shape  # noqa: F401
from .forms import ONNX_FORMS, onnx_form
from .quantize import quantize_onnx
from .runtimes import (OPENVINO_PRECISIONS, check_openvino_precision, onnx_session, openvino_chunked,
                       openvino_compile, openvino_default_precision)
from .tuning import TUNE_RUNTIMES, WHOLE_MODEL_ROUNDS, parse_tune, runtime_timer, tune_for_runtime, tuning_summary

__all__ = ["DeployError", "ExportResult", "export_onnx", "quantize_onnx", "onnx_session", "onnx_form",
           "ONNX_FORMS", "require_deploy", "check_output", "openvino_compile", "openvino_default_precision",
           "OPENVINO_PRECISIONS", "openvino_chunked", "check_openvino_precision", "onnx_input_shape",
           "MIN_VERIFY_IMAGES", "cpu_description", "CPU_FEATURES", "TUNE_RUNTIMES", "TUNE_KEY", "parse_tune",
           "runtime_timer", "tune_for_runtime", "tuning_summary"]
