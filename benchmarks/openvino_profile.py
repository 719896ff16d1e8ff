"""Where OpenVINO spends its time on EfficientNet-B0 vs kEffNet-B0 V2 16ch, and how fast the k-model could
be at most: per-operation CPU time from OpenVINO's own profiling counters.

Not a test: run it on a quiet machine, e.g.

    .venv/bin/python benchmarks/openvino_profile.py --setting 32-b64 --threads 2

It exports both models as ``benchmarks/runtimes.py`` does (``gpconv.export_onnx``, batch-norm statistics
from synthetic images), compiles them with ``PERF_COUNT`` on (OpenVINO's default precision: bf16 on a
CPU with AVX512-BF16, see ``--precision``), runs ``--runs`` inferences (of ``--chunk`` images at a time
when given, figures scaled to the whole batch) and prints two tables.

1. Per executed operation type, the milliseconds per inference of each model and their difference.
2. The convolutions sorted into what the grouped blocks can and cannot change: *depthwise*; *same
   layer in both* (a convolution of the k-model with the same input and weight shape as one of the
   baseline's: the stem and the blocks too narrow to group); *changed* (the k-model's other
   convolutions: its grouped and factored blocks) against the baseline's layers they replace; *other
   operations* (squeeze-excitation means, swish subgraphs, classifier, reorders). From it, two upper
   bounds on baseline / k-model (Amdahl's law): if the changed layers cost nothing, and if they ran at
   the baseline's milliseconds per multiply-add.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import describe_machine  # noqa: E402
from runtimes import MODELS, SETTINGS, build, export, images  # noqa: E402
from gpconv.export import OPENVINO_PRECISIONS, openvino_compile, openvino_default_precision  # noqa: E402


@dataclass
class Node:
    """One executed node: its operation type and its time; for a convolution its shapes."""

    kind: str
    ms: float
    kernel: str = ""  # OpenVINO's implementation (exec_type)
    shapes: Optional[Tuple[tuple, tuple]] = None  # (input, weight) of a convolution
    macs: int = 0
    elements: int = 0  # activation elements read and written


def _conv_shapes(compiled) -> dict:
    """{node name: ((input shape, weight shape), multiply-adds, activation elements read and written)} of
    the compiled graph's convolutions."""
    shapes = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in ("Convolution", "GroupConvolution"):
            source, weight = (tuple(op.input(i).get_partial_shape().to_shape()) for i in (0, 1))
            out = tuple(op.output(0).get_partial_shape().to_shape())
            shapes[op.get_friendly_name()] = ((source, weight), out[0] * prod(out[2:]) * prod(weight),
                                              prod(source) + prod(out))
    return shapes


def profile(path: Path, x: torch.Tensor, threads: int, runs: int, precision: Optional[str]) -> List[Node]:
    """The executed nodes of ``path`` with their mean ms per inference (OpenVINO's profiling counters)."""
    compiled = openvino_compile(path, tuple(x.shape), threads, precision, profile=True)
    request = compiled.create_infer_request()
    array = x.numpy()
    request.infer([array])  # warm-up
    times, kinds = defaultdict(float), {}
    for _ in range(runs):
        request.infer([array])
        for node in request.get_profiling_info():
            times[node.node_name] += node.real_time.total_seconds() * 1e3 / runs
            kinds[node.node_name] = (node.node_type, node.exec_type)
    convs = _conv_shapes(compiled)
    return [Node(*kinds[name][:1], ms, kinds[name][1], *convs.get(name, (None, 0, 0))) for name, ms in times.items()]


def by_type(nodes: List[Node]) -> dict:
    totals = defaultdict(float)
    for node in nodes:
        totals[node.kind] += node.ms
    return totals


def print_by_type(names, runs) -> None:
    print(f"{'operation':24}" + "".join(f"{n:>22}" for n in names) + f"{'difference':>12}")
    times = [by_type(nodes) for nodes in runs]
    for kind in sorted(set(times[0]) | set(times[1]), key=lambda k: -max(t.get(k, 0.0) for t in times)):
        a, b = (t.get(kind, 0.0) for t in times)
        if max(a, b) >= 0.05:
            print(f"{kind:24}{a:22.2f}{b:22.2f}{a - b:12.2f}")
    a, b = (sum(t.values()) for t in times)
    print(f"{'total':24}{a:22.2f}{b:22.2f}{a - b:12.2f}   ratio {a / b:.2f}x")


CLASSES = ("depthwise convolutions", "same layer in both", "changed layers", "other operations")


def _is_depthwise(node: Node) -> bool:
    weight = node.shapes[1]
    return len(weight) == 5 and weight[1:3] == (1, 1)  # groups x (1 out, 1 in) x kh x kw


def classify(baseline: List[Node], kmodel: List[Node]) -> List[dict]:
    """Per model, {class of CLASSES: [ms, multiply-adds, activation elements]}. A non-depthwise convolution is "same layer in
    both" when the other model has one with the same input and weight shape (matched one to one), else
    "changed": the k-model's grouped blocks, and in the baseline the layers they replace."""
    def pointwise(nodes):
        return Counter(n.shapes for n in nodes if n.shapes and not _is_depthwise(n))

    shared = pointwise(baseline) & pointwise(kmodel)
    classes = []
    for nodes in (baseline, kmodel):
        left, sums = Counter(shared), {label: [0.0, 0, 0] for label in CLASSES}
        for node in nodes:
            if node.shapes is None:
                label = "other operations"
            elif _is_depthwise(node):
                label = "depthwise convolutions"
            elif left[node.shapes] > 0:
                left[node.shapes] -= 1
                label = "same layer in both"
            else:
                label = "changed layers"
            sums[label][0] += node.ms
            sums[label][1] += node.macs
            sums[label][2] += node.elements
        classes.append(sums)
    return classes


def print_classes(names, runs) -> None:
    base, k = classify(*runs)
    print(f"{'part':24}" + "".join(f"{n:>22}" for n in names) + f"{'difference':>12}"
          + "   multiply-adds (G)   activations (M elements)")
    for label in CLASSES:
        (a, macs_a, elements_a), (b, macs_b, elements_b) = base[label], k[label]
        counts = (f"{macs_a / 1e9:8.2f} {macs_b / 1e9:8.2f}    {elements_a / 1e6:9.1f} {elements_b / 1e6:9.1f}"
                  if macs_a or macs_b else "")
        print(f"{label:24}{a:22.2f}{b:22.2f}{a - b:12.2f}   {counts}")
    total_b, total_k = (sum(v[0] for v in c.values()) for c in (base, k))
    (changed_b, macs_b, _), (changed_k, macs_k, elements_k) = base["changed layers"], k["changed layers"]
    rest = total_k - changed_k
    bounds = {"if the changed layers cost nothing": 0.0,
              "if they ran at the baseline's ms per multiply-add": changed_b * macs_k / macs_b,
              "if they ran at the depthwise convolutions' ms per activation element":
                  base["depthwise convolutions"][0] * elements_k / base["depthwise convolutions"][2]}
    print(f"measured baseline / k-model: {total_b / total_k:.2f}x; upper bounds (Amdahl), with the changed "
          f"layers' {changed_k:.2f} ms replaced:")
    for reading, ms in bounds.items():
        print(f"  {total_b / (rest + ms):.2f}x {reading} ({ms:.2f} ms)")


def print_layers(names, runs) -> None:
    """Every 1x1 convolution of each model in execution order: kernel, ms, input and weight shape."""
    for name, nodes in zip(names, runs):
        print(f"\n{name}: 1x1 convolutions (kernel, ms, input shape, weight shape)")
        for node in nodes:
            if node.shapes and node.shapes[1][-2:] == (1, 1) and not _is_depthwise(node):
                print(f"  {node.kernel:28}{node.ms:8.2f}  {str(list(node.shapes[0])):22}{list(node.shapes[1])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="32-b64", choices=list(SETTINGS))
    parser.add_argument("--models", default="EfficientNet-B0,kEffNet-B0 V2 16ch", help="comma-separated, two")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=None,
                        help="profile the batch as chunks of this many images (times scaled to the whole batch)")
    parser.add_argument("--layers", action="store_true", help="also list every 1x1 convolution with its kernel and time")
    parser.add_argument("--precision", default=None, choices=OPENVINO_PRECISIONS,
                        help="OpenVINO's inference precision (default: OpenVINO's default for this CPU)")
    args = parser.parse_args()
    names = args.models.split(",")
    size, batch, skip = SETTINGS[args.setting]
    torch.set_num_threads(args.threads)
    print(describe_machine())
    chunk = min(args.chunk or batch, batch)
    calibration, x = images(64, size), images(chunk, size)
    with tempfile.TemporaryDirectory(prefix="gpconv-ovprofile-") as folder:
        runs = []
        for name in names:
            model = build(MODELS[name], size, skip, calibration)
            path = export(model, Path(folder) / f"{name}.onnx", x, calibration)
            nodes = profile(path, x, args.threads, args.runs, args.precision)
            for node in nodes:  # one chunk's figures -> the whole batch's
                node.ms, node.macs, node.elements = (value * batch / chunk for value in
                                                     (node.ms, node.macs, node.elements))
            runs.append(nodes)
    precision = args.precision or openvino_default_precision()
    print(f"{size}x{size} batch {batch}" + (f" (skip_strides={skip})" if skip else "") +
          (f" in chunks of {chunk}" if chunk < batch else "") +
          f": OpenVINO CPU time per inference, ms ({args.runs} runs, {args.threads} threads, {precision})")
    print_by_type(names, runs)
    print()
    print_classes(names, runs)
    if args.layers:
        print_layers(names, runs)


if __name__ == "__main__":
    main()
