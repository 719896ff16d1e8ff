"""gpconv: interleaved grouped pointwise convolutions (kEffNet) for PyTorch."""

from .core.block import (GroupedPointwiseConv2d, GroupedPointwiseLinear, Grouping, pointwise_conv, set_execution,
                    set_recompute)
from .core.convert import convert, summarize
from .core.counting import count_computations, count_macs, count_parameters
from .core.fit import choose_channels_per_group, convert_and_fit, fit_to_dense, reconstruct_blocks
from .export import export_onnx
from .core.inference import inference_summary, prepare_for_inference
from .models import create_model, list_models, register_model
from .core.plan import PointwisePlan, make_plan

__version__ = "0.1.0"

__all__ = [
    "GroupedPointwiseConv2d", "GroupedPointwiseLinear", "Grouping", "pointwise_conv", "PointwisePlan", "make_plan",
    "create_model", "list_models", "register_model",
    "count_parameters", "count_macs", "count_computations", "convert", "summarize",
    "fit_to_dense", "reconstruct_blocks", "convert_and_fit", "choose_channels_per_group",
    "prepare_for_inference", "inference_summary", "set_execution", "set_recompute", "export_onnx",
]
