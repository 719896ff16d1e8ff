"""Model families. Importing this package registers every family with :func:`create_model`."""

from . import efficientnet  # noqa: F401  (registers efficientnet_b0 ... efficientnet_b7)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
