"""What gpconv.core.convert does to transformers', timm's and torchvision's models at their usual sizes: layers
replaced and trainable parameters before -> after, as the markdown table of docs/convert.md.

    python benchmarks/convert_models.py [--channels-per-group 16] [--num-classes 1000]

Models are built from their configs on the meta device (no weights, no download, no memory): the
counts depend on shapes only. Needs the ``interop`` extra (transformers, timm, torchvision).
"""

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

import gpconv

# torchvision 0.28.0 (the index's CUDA build) beside the CPU torch: the test suite's import helper (its
# docstring says why); transformers imports torchvision too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _torchvision_compat import make_torchvision_importable  # noqa: E402


def models(num_classes: int = 1000):
    """Name -> (model built from its config on the meta device, convert options)."""
    make_torchvision_importable()
    import timm
    import torchvision
    import transformers as hf

    labels = dict(num_labels=num_classes)  # ImageNet heads by default, as the checkpoints on the hub
    b0 = hf.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280,
                               dropout_rate=0.2, **labels)
    head = {"exclude": ["classifier"]}
    specs = {
        "ResNet-50": (lambda: hf.ResNetForImageClassification(hf.ResNetConfig(**labels)), head),
        "MobileNetV2 1.0": (lambda: hf.MobileNetV2ForImageClassification(hf.MobileNetV2Config(**labels)), head),
        "EfficientNet-B0": (lambda: hf.EfficientNetForImageClassification(b0), head),
        "ConvNeXt-T": (lambda: hf.ConvNextForImageClassification(hf.ConvNextConfig(**labels)),
                       {**head, "linear": True}),
    }
    for name, options in [("resnet50", {}), ("efficientnet_b0", {}), ("mobilenetv3_large_100", {}),
                          ("convnext_tiny", {"linear": True}), ("regnety_016", {})]:
        classifier = timm.models.get_pretrained_cfg(name).classifier
        specs[f"timm {name}"] = (lambda name=name: timm.create_model(name, num_classes=num_classes),
                                 {"exclude": [classifier], **options})
    for name, classifier in [("resnet50", "fc"), ("mobilenet_v3_large", "classifier"),
                             ("efficientnet_b0", "classifier")]:
        specs[f"torchvision {name}"] = (lambda name=name: getattr(torchvision.models, name)(num_classes=num_classes),
                                        {"exclude": [classifier]})
    with torch.device("meta"):
        return {name: (build(), options) for name, (build, options) in specs.items()}


def kinds(model) -> Counter:
    """How many layers of each kind the converted model has: grouped 1x1 convolutions, grouped linear
    layers, and what convert kept dense (by reason)."""
    summary = gpconv.summarize(model)
    counts = Counter("grouped Linear" if row.linear else "grouped 1x1 conv" for row in summary.rows)
    counts.update(f"kept: {layer.reason}" for layer in summary.kept)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels-per-group", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    print("| model | convert options | layers replaced | kept dense | parameters before -> after |")
    print("|---|---|---|---|---|")
    for name, (model, options) in models(args.num_classes).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = gpconv.convert(model, args.channels_per_group, **options)
        counts = kinds(small)
        replaced = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k.startswith("grouped"))
        kept = ", ".join(f"{n} {k[6:]}" for k, n in sorted(counts.items()) if k.startswith("kept")) or "none"
        before, after = gpconv.count_parameters(model), gpconv.count_parameters(small)
        option_text = ", ".join(f"{k}={v!r}".replace("'", '"') for k, v in options.items())
        print(f"| {name} | `{option_text}` | {replaced} | {kept} "
              f"| {before:,} -> {after:,} (-{100 * (1 - after / before):.0f}%) |")


if __name__ == "__main__":
    main()
