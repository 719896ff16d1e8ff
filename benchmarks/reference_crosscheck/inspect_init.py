"""Print the kernel initialiser of every weight layer of K-CAI's kEfficientNetB0 (D6v3_16ch) and the
standard deviation of the initial weights of its first squeeze-excitation reduction, next to what
gpconv's initialisation gives for the same layer (sqrt(2 / fan_out), computed here).

Run in the TensorFlow venv with K-CAI on PYTHONPATH:  python inspect_init.py
"""

import collections
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cai.efficientnet  # noqa: E402
import cai.layers  # noqa: E402

tf.keras.utils.set_random_seed(0)
model = cai.efficientnet.kEfficientNetB0(include_top=True, skip_stride_cnt=1, input_shape=(32, 32, 3), classes=10,
                                         kType=cai.layers.D6v3_16ch())
counts = collections.Counter()
for layer in model.layers:
    init = getattr(layer, "depthwise_initializer", None) or getattr(layer, "kernel_initializer", None)
    if init is None:
        continue
    config = init.get_config()
    detail = ", ".join(f"{k}={config[k]}" for k in ("scale", "mode", "distribution") if k in config)
    kind = "1x1" if getattr(layer, "kernel_size", None) == (1, 1) else type(layer).__name__
    counts[(type(layer).__name__, kind, type(init).__name__, detail)] += 1
for (layer_type, kind, init, detail), n in sorted(counts.items()):
    print(f"{n:4d} x {layer_type:20s} {kind:16s} {init} {detail}")
for layer in model.layers:
    if "se_reduce" in layer.name and isinstance(layer, tf.keras.layers.Conv2D) and layer.groups > 1:
        kernel = layer.get_weights()[0]  # (1, 1, in/groups, filters)
        fan_out = kernel.shape[-1]
        print(f"{layer.name}: kernel {kernel.shape}, groups {layer.groups}, std {kernel.std():.3f} "
              f"(glorot: {np.sqrt(2 / (kernel.shape[2] + fan_out)):.3f}; gpconv's sqrt(2/fan_out): "
              f"{np.sqrt(2 / fan_out):.3f})")
        break
