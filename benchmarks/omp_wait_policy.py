"""Training-step time with and without ``OMP_WAIT_POLICY=PASSIVE`` on a CPU shared with other work.

Each measurement is a fresh Python process (the policy is read when OpenMP starts) that times a few
training steps of EfficientNet-B0 (32x32, batch 64, skip_strides 1, 2 threads). ``--load N`` starts N
busy-looping processes beside it, as other jobs on a shared machine would be. The two settings
alternate for ``--rounds`` rounds; the median step time of each is printed.

    .venv/bin/python benchmarks/omp_wait_policy.py --load 2 --rounds 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys

STEP = r"""
import time, torch
import torch.nn.functional as F
from gpconv.models import create_model
torch.set_num_threads(2)
torch.manual_seed(0)
model = create_model("efficientnet_b0", 10, skip_strides=1).to(memory_format=torch.channels_last)
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
x = torch.rand(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (64,))
times = []
for step in range(STEPS):
    started = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - started)
print(sorted(times[1:])[len(times[1:]) // 2])
"""


def busy() -> None:
    while True:
        pass


def step_time(passive: bool, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    result = subprocess.run([sys.executable, "-c", STEP.replace("STEPS", str(steps))], env=env, check=True,
                            capture_output=True, text=True, timeout=1800)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    loaders = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for process in loaders:
        process.start()
    results = {"default": [], "PASSIVE": []}
    try:
        for _ in range(args.rounds):
            results["default"].append(step_time(False, args.steps))
            results["PASSIVE"].append(step_time(True, args.steps))
    finally:
        for process in loaders:
            process.terminate()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmark import describe_machine

    print(describe_machine())
    print(f"median training-step time, EfficientNet-B0 32x32 batch 64, 2 threads, {args.load} busy processes beside:")
    for name, values in results.items():
        print(f"  OMP_WAIT_POLICY={name:8s} {statistics.median(values):7.3f} s  (rounds: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
