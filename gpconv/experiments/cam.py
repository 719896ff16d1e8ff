"""Class activation maps (CAM; Zhou et al. 2016), as in Figures 2 and 3 of Mendel 2022.

For a model whose last convolutional feature maps ``F`` (C x h x w) are globally averaged and fed to
a linear classifier with weights ``W`` (classes x C), the map of class ``k`` is
``sum_c W[k, c] * F[c]`` (no ReLU), upsampled bilinearly to the image size and normalised to
``[0, 1]``. Overlaid with a jet colormap: red is where the evidence for the class is, blue is not.

Every family of :mod:`gpconv.models` but ``mobilenet_v3_large`` (it has a non-linear head between the
pool and the classifier) has ``model.pool`` (global average pool) and a final ``nn.Linear`` in
``model.classifier``; the feature maps are taken with a forward hook on ``model.pool``'s input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cam_layers", "cam", "load_model_from_checkpoint", "write_cams", "variant_label"]


def cam_layers(model: nn.Module) -> Tuple[nn.Module, nn.Linear]:
    """``(global pool, final linear layer)`` of ``model``; ValueError (one line) when CAM does not apply."""
    pool, classifier = getattr(model, "pool", None), getattr(model, "classifier", None)
    head = getattr(model, "head", None)
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)] if isinstance(classifier, nn.Module) else []
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or not linears or (
            head is not None and any(True for _ in head.parameters())):
        raise ValueError(f"CAM needs a model whose last feature maps go through a global average pool "
                         f"(model.pool) straight into a linear classifier (model.classifier); "
                         f"{type(model).__name__} does not")
    return pool, linears[-1]


def cam(model: nn.Module, image: torch.Tensor, class_index: Optional[int] = None) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """Class activation map of one image.

    ``image``: float ``(3, H, W)`` as the model takes it. ``class_index``: the class to explain
    (default: the predicted one). Returns ``(map, predicted class, class probabilities)``; ``map`` is
    ``(H, W)`` in ``[0, 1]`` (all zeros when the map is flat, e.g. 1x1 feature maps).
    """
    pool, linear = cam_layers(model)
    captured = {}
    handle = pool.register_forward_hook(lambda module, inputs, output: captured.__setitem__("maps", inputs[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(image.unsqueeze(0))
    finally:
        handle.remove()
        model.train(was_training)
    maps = captured["maps"][0].float()  # (C, h, w)
    if maps.shape[0] != linear.in_features:
        raise ValueError(f"the pooled feature maps have {maps.shape[0]} channels but the classifier takes "
                         f"{linear.in_features}: CAM does not apply")
    probabilities = torch.softmax(logits[0].float(), dim=0)
    predicted = int(probabilities.argmax())
    chosen = predicted if class_index is None else int(class_index)
    if not 0 <= chosen < linear.out_features:
        raise ValueError(f"class index {chosen} is out of range: the model has {linear.out_features} classes")
    weights = linear.weight[chosen].detach().float().to(maps.device)
    raw = torch.einsum("c,chw->hw", weights, maps)
    upsampled = F.interpolate(raw[None, None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    low, high = upsampled.min(), upsampled.max()
    flat = raw.numel() == 1 or float(high - low) <= 1e-6 * max(float(upsampled.abs().max()), 1e-12)
    normalised = torch.zeros_like(upsampled) if flat else (upsampled - low) / (high - low)
    return normalised.cpu(), predicted, probabilities.cpu()


def variant_label(model_config) -> str:
    """``baseline``, ``v2-16ch``, ``v2-16ch-noL``, ``v2-16ch-relu`` ... from a ModelConfig."""
    if model_config.channels_per_group is None:
        label = "baseline"
    else:
        label = f"v{model_config.version}-{model_config.channels_per_group}ch" + ("" if model_config.l_layer else "-noL")
        if model_config.activation == "relu":
            label += "-relu"
    return label


def load_model_from_checkpoint(path):
    """``(model in eval mode, ModelConfig, checkpoint dict)`` from a gpconv checkpoint (``weights_only``)."""
    from .checkpoint import MODEL_KEYS, CheckpointError, load_checkpoint
    from .config import ModelConfig

    checkpoint = load_checkpoint(path, require=MODEL_KEYS)
    model_config = ModelConfig.from_dict(checkpoint["model_config"])
    model = model_config.build()
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit {model_config.arch}: {str(error).splitlines()[0]}") from None
    return model.eval(), model_config, checkpoint


def _panel(axis, image, heat, title: str) -> None:
    axis.imshow(image, interpolation="nearest")
    if heat is not None:
        axis.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def write_cams(checkpoint, output, *, dataset: Optional[str] = None, data_dir: Optional[str] = None, images: int = 8,
               compare: Optional[str] = None, class_index: Optional[int] = None, overwrite: bool = False,
               log: Callable[[str], None] = print) -> List[Path]:
    """CAM overlays of the first ``images`` test images: ``output/cam_NNN.png`` (one per image) and
    ``output/cam_grid.png`` (all of them). With ``compare`` (a second checkpoint) both models are
    shown side by side on the same images. Returns the written paths, the grid last. Refused (one
    line) when one of those files exists and ``overwrite`` is false."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .data import load_dataset, to_float
    from ..io import claim_outputs
    from .results import save_figure

    output = claim_outputs(output, [f"cam_{i:03d}.png" for i in range(images)] + ["cam_grid.png"],
                           overwrite=overwrite)
    paths = [checkpoint] + ([compare] if compare else [])
    loaded = [load_model_from_checkpoint(path) for path in paths]
    first_config, first_checkpoint = loaded[0][1], loaded[0][2]
    for model, config, stored in loaded[1:]:
        if (config.num_classes, config.image_size) != (first_config.num_classes, first_config.image_size):
            raise ValueError(f"{compare} ({config.num_classes} classes, {config.image_size}px) does not match "
                             f"{checkpoint} ({first_config.num_classes} classes, {first_config.image_size}px)")
    train_config = first_checkpoint["train_config"]
    dataset = dataset or train_config.get("dataset")
    if not dataset:
        raise ValueError(f"{checkpoint} does not say which dataset it was trained on: pass --dataset")
    data_dir = data_dir if data_dir is not None else train_config.get("data_dir")
    splits = load_dataset(dataset, data_dir, image_size=first_config.image_size, seed=train_config.get("seed", 0),
                          synthetic_size=tuple(train_config.get("synthetic_size", (2000, 500))))
    if splits.num_classes != first_config.num_classes:
        raise ValueError(f"{checkpoint} has {first_config.num_classes} classes, {dataset} has {splits.num_classes}")
    names = list(splits.class_names)
    count = min(images, len(splits.test))
    labels = [variant_label(config) for _, config, _ in loaded]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({Path(path).parent.name}/{Path(path).name})" for label, path in zip(labels, paths)]
    log(f"CAM of {', '.join(labels)} on {count} {dataset} test images -> {output}")
    for (model, config, _), label in zip(loaded, labels):
        pool, _ = cam_layers(model)
        captured = []
        handle = pool.register_forward_hook(lambda module, inputs, out: captured.append(inputs[0].shape[-2:]))
        with torch.no_grad():
            model(to_float(splits.test.images[:1]))
        handle.remove()
        if tuple(captured[0]) == (1, 1):
            log(f"warning: {label}'s last feature maps are 1x1 at {config.image_size}px (skip_strides "
                f"{config.skip_strides}): its maps are flat (all blue); train with a larger skip_strides or image size")

    rows = []  # (image HWC, true name, [(heat, title)])
    for index in range(count):
        tensor = to_float(splits.test.images[index:index + 1])[0]
        true = names[int(splits.test.labels[index])]
        panels = []
        for (model, _, _), label in zip(loaded, labels):
            heat, predicted, probabilities = cam(model, tensor, class_index)
            shown = names[class_index] if class_index is not None else names[predicted]
            panels.append((heat.numpy(), f"{label}: pred {names[predicted]} ({probabilities[predicted]:.2f})"
                                         + (f"\nmap of {shown}" if class_index is not None else "")))
        rows.append((tensor.permute(1, 2, 0).numpy(), true, panels))

    written: List[Path] = []
    for index, (image, true, panels) in enumerate(rows):
        figure, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.9))
        _panel(axes[0], image, None, f"image: {true}")
        for axis, (heat, title) in zip(axes[1:], panels):
            _panel(axis, image, heat, title)
        figure.tight_layout()
        try:
            written.append(save_figure(figure, output / f"cam_{index:03d}.png"))
        finally:
            plt.close(figure)
    height = 2.5 * len(rows) + 0.4
    figure, axes = plt.subplots(len(rows), len(loaded) + 1, figsize=(2.6 * (len(loaded) + 1), height), squeeze=False)
    for row, (image, true, panels) in zip(axes, rows):
        _panel(row[0], image, None, f"true: {true}")
        for axis, (heat, title) in zip(row[1:], panels):
            _panel(axis, image, heat, title)
    figure.suptitle("Class activation maps (red: relevant, blue: not)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))  # room for the title above the first row
    try:
        written.append(save_figure(figure, output / "cam_grid.png"))
    finally:
        plt.close(figure)
    log(f"wrote {len(rows)} overlay PNG(s) and {output / 'cam_grid.png'}")
    return written
