"""Model families. Importing this package registers every family with :func:`create_model`."""

from . import densenet, efficientnet, inception, mobilenet, mobilenet_v3  # noqa: F401  (registration)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
