"""Model families. Importing this package registers every family with :func:`create_model`."""

from . import densenet, efficientnet, inception, mobilenet, mobilenet_v3  # noqa: F401  (registration)
from .base import ImageClassifier
from .registry import (CLASSIFIER_INITS, check_input_size, check_width, create_model, family_options, init_classifier,
                       list_models, min_input_size, register_model, scale_channels)

__all__ = ["create_model", "list_models", "register_model", "min_input_size", "check_input_size", "init_classifier",
           "CLASSIFIER_INITS", "ImageClassifier", "check_width", "scale_channels", "family_options"]
