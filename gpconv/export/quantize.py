"""Static int8 copies of exported files (ONNX Runtime's post-training quantization)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from .deploy import DeployError, _quiet_loggers, require_deploy
from .files import GPCONV_MARK, _check_input_shape, _write_bytes, check_output, onnx_input_shape

__all__ = ["quantize_onnx"]


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a float image tensor, in batches."""

    def __init__(self, images: torch.Tensor, batch_size: int):
        self._batches = iter([images[start:start + batch_size].float().contiguous().numpy()
                              for start in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


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
