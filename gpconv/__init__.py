"""gpconv: interleaved grouped pointwise convolutions (kEffNet) for PyTorch."""

from .block import (GroupedPointwiseConv2d, GroupedPointwiseLinear, Grouping, pointwise_conv, set_execution,
                    set_recompute)
from .convert import convert, summarize
from .counting import count_computations, count_macs, count_parameters
from .export import export_onnx
from .inference import prepare_for_inference
from .models import create_model, list_models, register_model
from .plan import PointwisePlan, make_plan

__version__ = "0.1.0"

__all__ = [
    "GroupedPointwiseConv2d", "GroupedPointwiseLinear", "Grouping", "pointwise_conv", "PointwisePlan", "make_plan",
    "create_model", "list_models", "register_model",
    "count_parameters", "count_macs", "count_computations", "convert", "summarize",
    "prepare_for_inference", "set_execution", "set_recompute", "export_onnx",
]
