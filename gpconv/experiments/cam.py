"""Class activation maps (CAM; Zhou et al. 2016), as in Figures 2 and 3 of Mendel 2022.

For a model whose last convolutional feature maps ``F`` (C x h x w) are globally averaged and fed to
a linear classifier with weights ``W`` (classes x C), the map of class ``k`` is
``sum_c W[k, c] * F[c]`` (no ReLU), upsampled bilinearly to the image size and normalised to
``[0, 1]``. Overlaid with a jet colormap: red is where the evidence for the class is, blue is not.

It uses the :class:`~gpconv.models.base.ImageClassifier` interface only: ``forward_features`` gives
``F``, ``forward_head`` the logits, ``classifier``'s final ``nn.Linear`` gives ``W``, and
``linear_head`` says whether CAM applies (every family but ``mobilenet_v3_large``, whose head has a
non-linear 1x1 convolution between the pool and the classifier).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import ImageClassifier
from .checkpoint import checkpoint_test_split, load_model_from_checkpoint
from .plots import load_pyplot, save_and_close

__all__ = ["cam_linear", "cam", "write_cams", "variant_label"]


def cam_linear(model: nn.Module) -> nn.Linear:
    """The final linear layer of ``model.classifier``; ValueError (one line) when CAM does not apply."""
    if not isinstance(model, ImageClassifier) or not model.linear_head:
        raise ValueError(f"CAM needs a gpconv model whose last feature maps go through a global average pool "
                         f"straight into a linear classifier (ImageClassifier with linear_head); "
                         f"{type(model).__name__} is not one")
    linear = list(model.classifier.modules())[-1]
    if not isinstance(linear, nn.Linear) or linear.in_features != model.num_features:
        raise ValueError(f"{type(model).__name__}.classifier does not end with a linear layer on its "
                         f"{model.num_features} feature channels: CAM does not apply")
    return linear


def _normalised_map(raw: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``raw`` (h, w) upsampled bilinearly to ``size`` and scaled to ``[0, 1]`` (zeros when flat)."""
    upsampled = F.interpolate(raw[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = upsampled.min(), upsampled.max()
    flat = raw.numel() == 1 or float(high - low) <= 1e-6 * max(float(upsampled.abs().max()), 1e-12)
    return torch.zeros_like(upsampled) if flat else (upsampled - low) / (high - low)


def cam(model: nn.Module, image: torch.Tensor, class_index: Optional[int] = None) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """Class activation map of one image.

    ``image``: float ``(3, H, W)`` as the model takes it. ``class_index``: the class to explain
    (default: the predicted one). Returns ``(map, predicted class, class probabilities)``; ``map`` is
    ``(H, W)`` in ``[0, 1]`` (all zeros when the map is flat, e.g. 1x1 feature maps).
    """
    linear = cam_linear(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(image.unsqueeze(0))
            logits = model.forward_head(features)
    finally:
        model.train(was_training)
    maps = features[0].float()  # (C, h, w)
    probabilities = torch.softmax(logits[0].float(), dim=0)
    predicted = int(probabilities.argmax())
    chosen = predicted if class_index is None else int(class_index)
    if not 0 <= chosen < linear.out_features:
        raise ValueError(f"class index {chosen} is out of range: the model has {linear.out_features} classes")
    weights = linear.weight[chosen].detach().float().to(maps.device)
    raw = torch.einsum("c,chw->hw", weights, maps)
    return _normalised_map(raw, tuple(image.shape[-2:])).cpu(), predicted, probabilities.cpu()


def variant_label(model_config) -> str:
    """``baseline``, ``v2-16ch``, ``v2-16ch-noL``, ``v2-16ch-relu`` ... from a ModelConfig."""
    if model_config.channels_per_group is None:
        label = "baseline"
    else:
        label = f"v{model_config.version}-{model_config.channels_per_group}ch" + ("" if model_config.l_layer else "-noL")
        if model_config.activation == "relu":
            label += "-relu"
    return label


def _load_models(paths) -> list:
    """``[(model, ModelConfig, checkpoint)]`` of ``paths``, refused when their classes or image sizes differ."""
    loaded = [load_model_from_checkpoint(path) for path in paths]
    first = loaded[0][1]
    for (_, config, _), path in zip(loaded[1:], paths[1:]):
        if (config.num_classes, config.image_size) != (first.num_classes, first.image_size):
            raise ValueError(f"{path} ({config.num_classes} classes, {config.image_size}px) does not match "
                             f"{paths[0]} ({first.num_classes} classes, {first.image_size}px)")
    return loaded


def _labels(loaded: list, paths) -> List[str]:
    """One label per model (its variant; with the checkpoint's path when two variants coincide)."""
    labels = [variant_label(config) for _, config, _ in loaded]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({Path(path).parent.name}/{Path(path).name})" for label, path in zip(labels, paths)]
    return labels


def _warn_flat_maps(loaded: list, labels: List[str], image: torch.Tensor, log: Callable[[str], None]) -> None:
    """Warn about every model whose last feature maps are 1x1 on ``image`` (1, 3, H, W): flat maps."""
    for (model, config, _), label in zip(loaded, labels):
        with torch.no_grad():
            size = tuple(model.forward_features(image).shape[-2:])
        if size == (1, 1):
            log(f"warning: {label}'s last feature maps are 1x1 at {config.image_size}px (skip_strides "
                f"{config.skip_strides}): its maps are flat (all blue); train with a larger skip_strides or image size")


def _rows(loaded: list, labels: List[str], test, names: List[str], count: int, class_index: Optional[int]) -> list:
    """``[(image HWC, true class name, [(heat map, panel title) per model])]`` of the first ``count`` images."""
    from .data import to_float

    rows = []
    for index in range(count):
        tensor = to_float(test.images[index:index + 1])[0]
        panels = []
        for (model, _, _), label in zip(loaded, labels):
            heat, predicted, probabilities = cam(model, tensor, class_index)
            title = f"{label}: pred {names[predicted]} ({probabilities[predicted]:.2f})"
            if class_index is not None:
                title += f"\nmap of {names[class_index]}"
            panels.append((heat.numpy(), title))
        rows.append((tensor.permute(1, 2, 0).numpy(), names[int(test.labels[index])], panels))
    return rows


def _panel(axis, image, heat, title: str) -> None:
    axis.imshow(image, interpolation="nearest")
    if heat is not None:
        axis.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def _write_overlays(plt, rows: list, output: Path) -> List[Path]:
    """``output/cam_NNN.png``: one figure per image, the image then each model's overlay."""
    written = []
    for index, (image, true, panels) in enumerate(rows):
        figure, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.9))
        _panel(axes[0], image, None, f"image: {true}")
        for axis, (heat, title) in zip(axes[1:], panels):
            _panel(axis, image, heat, title)
        figure.tight_layout()
        written.append(save_and_close(figure, output / f"cam_{index:03d}.png"))
    return written


def _write_grid(plt, rows: list, models: int, output: Path) -> Path:
    """``output/cam_grid.png``: one row per image, one column per model after the image."""
    height = 2.5 * len(rows) + 0.4
    figure, axes = plt.subplots(len(rows), models + 1, figsize=(2.6 * (models + 1), height), squeeze=False)
    for row, (image, true, panels) in zip(axes, rows):
        _panel(row[0], image, None, f"true: {true}")
        for axis, (heat, title) in zip(row[1:], panels):
            _panel(axis, image, heat, title)
    figure.suptitle("Class activation maps (red: relevant, blue: not)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))  # room for the title above the first row
    return save_and_close(figure, output / "cam_grid.png")


def write_cams(checkpoint, output, *, dataset: Optional[str] = None, data_dir: Optional[str] = None, images: int = 8,
               compare: Optional[str] = None, class_index: Optional[int] = None, overwrite: bool = False,
               log: Callable[[str], None] = print) -> List[Path]:
    """CAM overlays of the first ``images`` test images: ``output/cam_NNN.png`` (one per image) and
    ``output/cam_grid.png`` (all of them). With ``compare`` (a second checkpoint) both models are
    shown side by side on the same images. Returns the written paths, the grid last. Refused (one
    line) when one of those files exists and ``overwrite`` is false."""
    from ..io import claim_outputs
    from .data import to_float

    output = claim_outputs(output, [f"cam_{i:03d}.png" for i in range(images)] + ["cam_grid.png"],
                           overwrite=overwrite)
    paths = [checkpoint] + ([compare] if compare else [])
    loaded = _load_models(paths)
    dataset, splits = checkpoint_test_split(checkpoint, loaded[0][2], loaded[0][1], dataset, data_dir)
    count = min(images, len(splits.test))
    labels = _labels(loaded, paths)
    log(f"CAM of {', '.join(labels)} on {count} {dataset} test images -> {output}")
    _warn_flat_maps(loaded, labels, to_float(splits.test.images[:1]), log)
    rows = _rows(loaded, labels, splits.test, list(splits.class_names), count, class_index)
    plt = load_pyplot()
    written = _write_overlays(plt, rows, output) + [_write_grid(plt, rows, len(loaded), output)]
    log(f"wrote {len(rows)} overlay PNG(s) and {output / 'cam_grid.png'}")
    return written
