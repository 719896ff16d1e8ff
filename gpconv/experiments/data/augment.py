"""The papers' training augmentation: Keras' ``ImageDataGenerator`` as one batched affine warp."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["KerasAugment"]


@dataclass
class KerasAugment:
    """Batched random affine augmentation on tensors, as Keras' ``ImageDataGenerator`` of the papers.

    Defaults are the reference's ``create_image_generator(rotation_range=20, width_shift_range=0.3,
    height_shift_range=0.3)`` with its other defaults: shear 0.2 (Keras reads it in *degrees*), zoom
    0.3 (independent x and y scales in ``[0.7, 1.3]``), horizontal flip, ``fill_mode='nearest'``
    (edge pixels repeat: ``padding_mode='border'``). Keras interpolates with order 1, so the default
    ``interpolation`` is ``'bilinear'``; ``'nearest'`` is available. Works on any device; the random
    parameters come from the given CPU ``torch.Generator`` so a run is reproducible and resumable.
    """

    rotation_degrees: float = 20.0
    shift: float = 0.3
    shear_degrees: float = 0.2
    zoom: float = 0.3
    horizontal_flip: bool = True
    interpolation: str = "bilinear"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = images.shape[0]

        def uniform(bound):
            return (torch.rand(n, generator=generator) * 2 - 1) * bound

        theta = torch.deg2rad(uniform(self.rotation_degrees))
        shear = torch.deg2rad(uniform(self.shear_degrees))
        zx, zy = 1 + uniform(self.zoom), 1 + uniform(self.zoom)
        tx, ty = uniform(self.shift) * 2, uniform(self.shift) * 2  # fraction of size -> [-1, 1] coordinates
        flip = torch.rand(n, generator=generator) < 0.5 if self.horizontal_flip else torch.zeros(n, dtype=torch.bool)
        cos, sin = torch.cos(theta), torch.sin(theta)
        # output pixel -> input pixel: rotation . shear . zoom, then shift (as Keras' transform_matrix)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shear_m = torch.stack([torch.stack([torch.ones(n), -torch.sin(shear)], -1),
                               torch.stack([torch.zeros(n), torch.cos(shear)], -1)], -2)
        zoom_m = torch.diag_embed(torch.stack([zx, zy], -1))
        linear = rotation @ shear_m @ zoom_m
        linear[:, :, 0] *= torch.where(flip, -1.0, 1.0)[:, None]  # flip the output's x axis
        matrix = torch.cat([linear, torch.stack([tx, ty], -1)[:, :, None]], dim=2)
        matrix = matrix.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
