"""The CPU that runs an exported model, in one line: printed with every timing table and recorded in
a tuned export (gpconv.export.tuning), since which form of a model runs fastest depends on it; a tuned
file run on a CPU of another kind says so (:func:`_warn_if_tuned_elsewhere`). Standard library only."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

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


def _cpu_kind(description: str) -> str:
    """A :func:`cpu_description` without its core count: the model and the features, which decide the
    kernels a runtime picks (machines of one kind in a fleet differ in cores, not in kernels)."""
    head, _, features = description.partition("; ")
    return f"{head.rpartition(', ')[0]}; {features}"


def _warn_if_tuned_elsewhere(tuning: Optional[str], source) -> Optional[str]:
    """``tuning``: the record a tuned export carries in its metadata (JSON under ``gpconv.tune``; None
    for an untuned file). When it was tuned on a CPU of another kind than this one (:func:`_cpu_kind`),
    one :func:`warnings.warn` line names both CPUs and how to re-tune, and is returned; else None."""
    record = json.loads(tuning) if tuning else {}
    here = cpu_description()
    if "cpu" not in record or _cpu_kind(record["cpu"]) == _cpu_kind(here):
        return None
    runtime = record["runtime"].split()[0]
    tune = f"{runtime}:{record['precision']}" if runtime == "openvino" else runtime
    message = (f"{source} was tuned for {runtime} on another CPU ({record['cpu']}), this one is {here}: its "
               f"blocks' forms may not be the fastest here; re-tune it on this CPU: gpconv export ... --tune {tune} "
               f"(export_onnx(..., tune={tune!r}))")
    warnings.warn(message, stacklevel=3)
    return message
