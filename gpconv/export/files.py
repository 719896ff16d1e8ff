"""Exported files on disk: the output rule (gpconv's mark in the metadata; only files that carry it are
ever replaced), the metadata keys, atomic writes, and the input shape a file takes."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write
from .deploy import DeployError, require_deploy

__all__ = ["GPCONV_MARK", "TUNE_KEY", "EXPORTER_KEY", "check_output", "onnx_input_shape"]

# Written into every exported file (metadata_props): export_onnx only overwrites files that carry it.
GPCONV_MARK = "gpconv.export"
# The metadata key of a tuned export's choice (tune_for_runtime's record as JSON).
TUNE_KEY = "gpconv.tune"
# Metadata key naming the PyTorch exporter that wrote the file: "torchscript" or "dynamo".
EXPORTER_KEY = "gpconv.exporter"


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
