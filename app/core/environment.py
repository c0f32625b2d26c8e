"""The machine a model was built or measured on, for lineage and reports: package versions
(read from metadata, nothing imported) and the CPU's vector-instruction flags."""
from __future__ import annotations

import platform
from pathlib import Path

LINEAGE_PACKAGES = ("torch", "monai", "onnx", "onnxruntime-gpu", "onnxruntime", "torch-pruning",
                    "numpy", "torchao")
CPU_FLAGS = {"avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
             "amx_int8", "fma", "f16c", "sse4_2"}


def package_versions(names=LINEAGE_PACKAGES) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def cpu_flags() -> list[str]:
    """The flags that decide int8/bf16 speed (VNNI, AMX, AVX-512 BF16 ...), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(CPU_FLAGS & set(flags))
