"""Train the reference implementation (K-CAI's kEfficientNetB0, TensorFlow/Keras 2) on a split
exported by export_split.py, with the protocol of the kEffNetV2 notebooks, and write a run folder
shaped like gpconv's: history.csv (same columns) and metrics.json (test at the best epoch).

Run in the throwaway TensorFlow venv, with K-CAI's checkout on PYTHONPATH (see README.md):
    python train_reference.py --split split-0.npz --seed 0 --epochs 10 --output runs/reference-s0
"""

import argparse
import csv
import json
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras = tf-keras (Keras 2), what K-CAI is written for
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cai.efficientnet  # noqa: E402
import cai.layers  # noqa: E402
import cai.util  # noqa: E402


def cyclical_lr(epoch: int, cycle: int, base: float = 1e-3) -> float:
    """The notebooks' cyclical schedule with a ``cycle``-epoch cycle (25 in the notebooks)."""
    local = epoch % cycle
    return base * (1 + 0.5 * local) if local < 7 else 4 * base * 0.85 ** (local - 7)


class EpochRecorder(tf.keras.callbacks.Callback):
    """Writes history.csv after every epoch; keeps the weights of the best epoch by validation
    accuracy (strictly better than all earlier epochs)."""

    def __init__(self, output: str, cycle: int):
        super().__init__()
        self.output, self.cycle, self.rows = output, cycle, []
        self.best_epoch, self.best_value, self.best_weights = None, -1.0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append([epoch + 1, cyclical_lr(epoch, self.cycle), logs["loss"], logs["accuracy"],
                          logs["val_loss"], logs["val_accuracy"], round(time.perf_counter() - self.started, 2)])
        with open(os.path.join(self.output, "history.csv"), "w", newline="") as out:  # after every epoch
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"])
            writer.writerows(self.rows)
        if logs["val_accuracy"] > self.best_value:
            self.best_epoch, self.best_value = epoch + 1, float(logs["val_accuracy"])
            self.best_weights = self.model.get_weights()


def set_torch_classifier_init(model, seed: int) -> None:
    """Re-draw the last Dense layer as PyTorch's nn.Linear draws it: kernel and bias uniform in
    +-1/sqrt(fan_in)."""
    dense = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)][-1]
    kernel, bias = dense.get_weights()
    bound = 1.0 / np.sqrt(kernel.shape[0])
    rng = np.random.default_rng(seed)
    dense.set_weights([rng.uniform(-bound, bound, kernel.shape).astype("float32"),
                       rng.uniform(-bound, bound, bias.shape).astype("float32")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True, help=".npz from export_split.py")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr-cycle", type=int, default=None, help="default: --epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-strides", type=int, default=1, help="K-CAI's skip_stride_cnt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="quick runs only")
    parser.add_argument("--classifier-init", choices=("family", "torch"), default="family",
                        help="family: K-CAI's own (Keras EfficientNet's); torch: uniform +-1/sqrt(fan_in) for "
                             "the classifier's kernel and bias, as gpconv's --classifier-init torch")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    cycle = args.lr_cycle or args.epochs

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(args.seed)  # Python, NumPy and TensorFlow seeds

    data = np.load(args.split)
    x = {name: data[f"x_{name}"].astype("float32") / 255.0 for name in ("train", "val", "test")}  # [0, 1]
    y = {name: tf.keras.utils.to_categorical(data[f"y_{name}"], 10) for name in ("train", "val", "test")}

    model = cai.efficientnet.kEfficientNetB0(include_top=True, skip_stride_cnt=args.skip_strides,
                                             input_shape=(32, 32, 3), classes=10, kType=cai.layers.D6v3_16ch())
    if args.classifier_init == "torch":
        set_torch_classifier_init(model, args.seed)
    model.compile(loss="categorical_crossentropy", optimizer=tf.keras.optimizers.RMSprop(), metrics=["accuracy"])
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    print(f"{model.name}: {trainable} trainable parameters; TF {tf.__version__}, "
          f"keras {tf.keras.__version__ if hasattr(tf.keras, '__version__') else '?'}", flush=True)

    # The notebooks' generator: K-CAI's defaults (shear 0.2, zoom 0.3, horizontal flip, nearest fill)
    # with rotation 20 and shifts 0.3. Validation and test images are not augmented (as gpconv).
    augment = cai.util.create_image_generator(rotation_range=20, width_shift_range=0.3, height_shift_range=0.3,
                                              channel_shift_range=0.0)
    flow = augment.flow(x["train"], y["train"], batch_size=args.batch_size, shuffle=True, seed=args.seed)
    os.makedirs(args.output, exist_ok=True)
    recorder = EpochRecorder(args.output, cycle)
    started = time.perf_counter()
    fit = model.fit(flow, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                    validation_data=(x["val"], y["val"]), validation_batch_size=256, verbose=2,
                    callbacks=[tf.keras.callbacks.LearningRateScheduler(lambda e: cyclical_lr(e, cycle)),
                               recorder])
    train_seconds = time.perf_counter() - started

    h = fit.history
    last_loss, last_accuracy = model.evaluate(x["test"], y["test"], batch_size=256, verbose=0)
    model.set_weights(recorder.best_weights)
    test_loss, test_accuracy = model.evaluate(x["test"], y["test"], batch_size=256, verbose=0)
    metrics = {"implementation": "reference (K-CAI kEfficientNetB0, D6v3_16ch)", "seed": args.seed,
               "test_accuracy": float(test_accuracy), "test_loss": float(test_loss),
               "best_epoch": recorder.best_epoch, "best_val_accuracy": recorder.best_value,
               "last_epoch_test_accuracy": float(last_accuracy), "last_epoch_test_loss": float(last_loss),
               "trainable_params": trainable, "epochs": len(h["loss"]), "lr_cycle": cycle,
               "batch_size": args.batch_size, "classifier_init": args.classifier_init, "skip_stride_cnt": args.skip_strides,
               "train_seconds": round(train_seconds, 1), "threads": args.threads, "tensorflow": tf.__version__}
    with open(os.path.join(args.output, "metrics.json"), "w") as out:
        json.dump(metrics, out, indent=2)
    print(f"test accuracy {test_accuracy:.4f}  test loss {test_loss:.4f}  (best epoch {recorder.best_epoch}, "
          f"{train_seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
