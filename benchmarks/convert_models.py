"""What gpconv.core.convert does to transformers' vision models at their usual sizes: layers replaced and
trainable parameters before -> after, as the markdown table of docs/convert.md.

    python benchmarks/convert_models.py [--channels-per-group 16]

Models are built from their configs on the meta device (no weights, no download, no memory): the
counts depend on shapes only. Needs the ``interop`` extra (transformers).
"""

import argparse
import warnings
from collections import Counter

import torch

import gpconv


def models():
    """Name -> (model built from its config on the meta device, convert options)."""
    import transformers as hf

    labels = dict(num_labels=1000)  # ImageNet heads, as the checkpoints on the hub
    b0 = hf.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280,
                               dropout_rate=0.2, **labels)
    specs = {
        "ResNet-50": (hf.ResNetForImageClassification, hf.ResNetConfig(**labels), {}),
        "MobileNetV2 1.0": (hf.MobileNetV2ForImageClassification, hf.MobileNetV2Config(**labels), {}),
        "EfficientNet-B0": (hf.EfficientNetForImageClassification, b0, {}),
        "ConvNeXt-T": (hf.ConvNextForImageClassification, hf.ConvNextConfig(**labels), {"linear": True}),
    }
    with torch.device("meta"):
        return {name: (cls(config), options) for name, (cls, config, options) in specs.items()}


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
    args = parser.parse_args(argv)
    print("| model | convert options | layers replaced | kept dense | parameters before -> after |")
    print("|---|---|---|---|---|")
    for name, (model, options) in models().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = gpconv.convert(model, args.channels_per_group, exclude=["classifier"], **options)
        counts = kinds(small)
        replaced = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k.startswith("grouped"))
        kept = ", ".join(f"{n} {k[6:]}" for k, n in sorted(counts.items()) if k.startswith("kept")) or "none"
        before, after = gpconv.count_parameters(model), gpconv.count_parameters(small)
        option_text = "".join(f", {k}={v}" for k, v in options.items())
        print(f"| {name} | `exclude=[\"classifier\"]{option_text}` | {replaced} | {kept} "
              f"| {before:,} -> {after:,} (-{100 * (1 - after / before):.0f}%) |")


if __name__ == "__main__":
    main()
