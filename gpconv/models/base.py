"""The interface every model family of :mod:`gpconv.models` implements.

:mod:`gpconv.experiments.cam` (class activation maps) and anything else that needs the feature maps
or the classifier of a gpconv model relies on this interface only, not on a family's own layout.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """Base class of the gpconv model families: an image classifier split into features and head.

    * ``forward_features(x)``: the last feature maps, ``(N, num_features, h, w)``, before pooling;
    * ``forward_head(features)``: the logits from those maps, ``(N, classes)``; by default
      ``classifier(flatten(pool(features)))``;
    * ``forward(x) == forward_head(forward_features(x))`` (no softmax);
    * ``pool``: the global average pool (``nn.AdaptiveAvgPool2d(1)``) that ``forward_head`` starts with;
    * ``classifier``: the module that maps the pooled features to the logits; its last module is the
      final ``nn.Linear`` (optionally after dropout);
    * ``num_features``: the channels of ``forward_features``' output;
    * ``linear_head``: True when ``forward_head`` is exactly ``pool`` -> ``classifier`` with nothing
      non-linear between the feature maps and the final linear layer (dropout is the identity in
      eval mode), so that the class activation maps of Zhou et al. 2016 apply. A family with more
      layers after the pool (MobileNet V3's 1x1 convolution on the pooled features) sets it False.

    A family sets ``pool``, ``classifier`` and ``num_features`` in ``__init__`` and implements
    ``forward_features``; it overrides ``forward_head`` only when its head is not ``pool`` ->
    ``classifier``. The base class holds no parameters: module names (and so ``state_dict`` keys)
    are the family's own.
    """

    linear_head: bool = True
    pool: nn.Module
    classifier: nn.Module
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_features")

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
