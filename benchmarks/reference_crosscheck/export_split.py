"""Export gpconv's CIFAR-10 split (train / validation / test for one seed) to an .npz that the
TensorFlow side reads, so that both implementations train and test on the same images.

Run with gpconv's venv:  python export_split.py --data-dir DIR --seed S --output split-S.npz
Arrays: x_train, x_val, x_test as uint8 NHWC; y_train, y_val, y_test as int64 labels.
"""

import argparse

import numpy as np

from gpconv.experiments.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    splits = load_dataset("cifar10", args.data_dir, image_size=32, seed=args.seed)
    arrays = {}
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        arrays[f"x_{name}"] = part.images.permute(0, 2, 3, 1).contiguous().numpy()  # NCHW -> NHWC
        arrays[f"y_{name}"] = part.labels.numpy()
    np.savez_compressed(args.output, **arrays)
    print(args.output, {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
