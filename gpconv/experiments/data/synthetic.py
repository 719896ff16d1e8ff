"""The ``synthetic`` dataset: generated, seeded, 32x32, 10 classes, no download."""

from __future__ import annotations

import torch

from .splits import ImageSet

__all__ = ["SYNTHETIC_CLASSES", "make_synthetic"]

SYNTHETIC_CLASSES = ("disc", "square", "ring", "horizontal-bars", "vertical-bars", "diagonal-bars", "plus",
                     "triangle", "checkerboard", "two-dots")


def make_synthetic(count: int, seed: int, image_size: int = 32) -> ImageSet:
    """A generated, learnable 10-class set: one coloured shape per image on a noisy background.

    The class decides the shape (:data:`SYNTHETIC_CLASSES`) and the hue of the shape (class ``c``
    has hue ``c / 10`` plus a little jitter), so both shape and colour carry the label; position,
    size, brightness, background and noise are random. Images are ``uint8`` ``(count, 3, S, S)``,
    labels cycle through the classes in a seeded random order. Same ``seed`` -> same images.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=g)]
    s = image_size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = coords.view(1, s, 1).expand(count, s, s), coords.view(1, 1, s).expand(count, s, s)

    def rand(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    cx, cy = rand(count, 1, 1, low=0.35, high=0.65), rand(count, 1, 1, low=0.35, high=0.65)
    r = rand(count, 1, 1, low=0.18, high=0.3)
    dx, dy = xx - cx, yy - cy
    period = rand(count, 1, 1, low=0.16, high=0.24)
    box = (dx.abs() < r) & (dy.abs() < r)
    masks = {
        0: dx ** 2 + dy ** 2 < r ** 2,
        1: box,
        2: ((dx ** 2 + dy ** 2).sqrt() - r * 0.75).abs() < r * 0.25,
        3: box & (torch.remainder(yy / period, 1.0) < 0.5),
        4: box & (torch.remainder(xx / period, 1.0) < 0.5),
        5: box & (torch.remainder((xx + yy) / period, 1.0) < 0.5),
        6: box & ((dx.abs() < r * 0.3) | (dy.abs() < r * 0.3)),
        7: (dy < r) & (dy > -r) & (dx.abs() < (dy + r) * 0.5),
        8: box & ((torch.remainder(xx / period, 1.0) < 0.5) ^ (torch.remainder(yy / period, 1.0) < 0.5)),
        9: ((dx - r * 0.6) ** 2 + dy ** 2 < (r * 0.45) ** 2) | ((dx + r * 0.6) ** 2 + dy ** 2 < (r * 0.45) ** 2),
    }
    mask = torch.zeros(count, s, s, dtype=torch.bool)
    for label, shape_mask in masks.items():
        chosen = labels == label
        mask[chosen] = shape_mask[chosen]
    hue = (labels.float() / 10 + rand(count, low=-0.02, high=0.02)) % 1.0
    value = rand(count, low=0.7, high=1.0)
    # HSV (saturation 0.8) -> RGB, vectorised
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], dim=1)
    colour = value[:, None] * (1 - 0.8 * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    background = rand(count, 3, 1, 1, low=0.0, high=0.35)
    noise = 0.06 * torch.randn(count, 3, s, s, generator=g)
    images = torch.where(mask[:, None], colour[:, :, None, None], background) + noise
    return ImageSet((images.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64))

