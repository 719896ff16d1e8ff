"""The ``deploy`` extra (onnx, onnxscript, onnxruntime, openvino), imported only when a function needs
it, and the one error every export, runtime and quantization function raises."""

from __future__ import annotations

import contextlib
import importlib
import logging

__all__ = ["DeployError", "require_deploy"]


class DeployError(ValueError):
    """Export or quantization cannot be done (one-line message)."""


def require_deploy(module: str):
    """Import ``module`` (onnx, onnxruntime, openvino, ...) or raise :class:`DeployError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DeployError(f"{module} is not installed: ONNX export and runtimes need the deploy extra "
                          "(pip install 'gpconv[deploy]')") from None


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs warnings per node (torchvision ops, attribute types): hide them meanwhile."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
