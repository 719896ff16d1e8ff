"""Memory of one training epoch's batch reads: the memory-mapped cache of the named datasets
(``gpconv.experiments.paper_datasets.MappedImages``) next to the same images held in RAM as a uint8 tensor.
Not a test:

    .venv/bin/python benchmarks/dataset_memory.py --images 3000 --size 224

It writes a cache of random images in the layout ``prepare_cache`` writes (in a temporary folder),
then, in a fresh process per mode, reads every image once in shuffled batches as the training loop
does (``to_float(images[indices])``) and reports the peak anonymous (non-reclaimable) resident memory
(``RssAnon``) and the seconds the epoch's reads took. Pages of the memory map are file-backed: the
kernel may drop them at any time, so they are not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpconv.experiments.data import to_float  # noqa: E402
from gpconv.experiments.paper_datasets import MappedImages  # noqa: E402


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_epoch(mode: str, path: Path, count: int, size: int, batch: int) -> dict:
    """Read every image once in shuffled batches; the peak RssAnon (MiB) and the seconds it took."""
    shape = (count, 3, size, size)
    started = time.perf_counter()
    if mode == "mapped":
        images = MappedImages(np.memmap(path, dtype=np.uint8, mode="r", shape=shape), np.arange(count))
    else:
        images = torch.from_numpy(np.fromfile(path, dtype=np.uint8).reshape(shape))
    peak = rss_anon_mib()
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    for indices in order.split(batch):
        to_float(images[indices]).mean()
        peak = max(peak, rss_anon_mib())
    return {"mode": mode, "peak_rss_anon_mib": round(peak), "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_epoch(args.child[0], Path(args.child[1]), args.images, args.size, args.batch)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "images.u8"
        rng = np.random.default_rng(0)
        with open(path, "wb") as out:
            for start in range(0, args.images, 256):
                rows = min(256, args.images - start)
                out.write(rng.integers(0, 256, (rows, 3, args.size, args.size), dtype=np.uint8).tobytes())
        print(f"{args.images} images at {args.size}x{args.size}: {path.stat().st_size / 2 ** 20:.0f} MiB of uint8, "
              f"batches of {args.batch}")
        for mode in ("mapped", "in-memory"):
            command = [sys.executable, __file__, "--images", str(args.images), "--size", str(args.size), "--batch",
                       str(args.batch), "--child", mode, str(path)]
            print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
