"""The CPU that runs an exported model, in one line: printed with every timing table and recorded in
a tuned export (gpconv.export.tuning), since which form of a model runs fastest depends on it. Standard
library only."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CPU_FEATURES", "cpu_description"]

# The /proc/cpuinfo flags that decide which CPU kernels the runtimes pick (oneDNN, MLAS, OpenVINO) and how
# fast grouped vs dense 1x1 convolutions run (docs/performance.md), with the names Intel's manuals give them.
CPU_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"),
                ("avx512_fp16", "AVX512-FP16"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This CPU's model name, core count and its matrix/vector features (:data:`CPU_FEATURES`), e.g.
    ``"Intel(R) Xeon(R) Processor @ 2.80GHz, 2 cores; AVX2, AVX-512, AVX512-VNNI; no AVX512-BF16, ..."``:
    printed with every timing table and recorded in a tuned export, since which form of a model is fastest
    depends on them. Without ``cpuinfo`` (not Linux) the model is ``platform.processor()`` and the features
    are "unknown"."""
    import platform

    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():  # the first processor's values (later blocks repeat the keys)
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags_line = fields.get("flags", fields.get("Features"))
    head = f"{model}, {os.cpu_count()} cores"
    if flags_line is None:
        return head + "; features unknown"
    flags = set(flags_line.split())
    present = [name for flag, name in CPU_FEATURES if flag in flags]
    absent = [name for flag, name in CPU_FEATURES if flag not in flags]
    return "; ".join([head] + [", ".join(present)] * bool(present) + [f"no {', '.join(absent)}"] * bool(absent))
