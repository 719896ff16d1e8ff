"""Make the package index's torchvision importable beside a CPU torch, for the test suite only.

Why: for torch 2.13.0 the package index has one torchvision, 0.28.0, built for CUDA. Beside the CPU
torch its compiled operators (``torchvision/_C.so``) cannot load, and ``import torchvision`` then dies
in ``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not
exist`` (the error of pytorch/pytorch#122494): it registers fake kernels for operators that were never
defined. timm imports torchvision unconditionally, and transformers imports it when installed, so
without this every timm and torchvision test, and transformers' ResNet, would fail to import here.

What: when, and only when, the plain import fails with that error, the two operator schemas it needs
(``torchvision::nms`` and ``torchvision::qnms``, as torchvision's C++ code declares them) are defined
through ``torch.library`` and the import is tried again. torchvision's Python models and transforms
then import and run; its compiled detection operators stay unavailable (calling ``nms`` fails). A
torchvision that imports normally (a matching CPU build, a CUDA machine) is left untouched. The
library itself never does this.
"""

import sys

import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARY = []  # keeps the torch.library.Library that holds the schemas alive


def _forget_torchvision() -> None:
    """Drop the half-imported torchvision modules a failed import leaves behind."""
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]


def make_torchvision_importable() -> str:
    """Import torchvision, defining its two missing operator schemas first when its compiled operators
    cannot load. Returns ``"absent"``, ``"native"`` (imported as it is) or ``"schemas defined"``."""
    try:
        import torchvision  # noqa: F401
        return "native"
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise
        return "absent"
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
    _forget_torchvision()
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARY.append(library)
    import torchvision  # noqa: F401,F811
    return "schemas defined"
