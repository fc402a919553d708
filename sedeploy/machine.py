"""What CPU this is: the one reader of /proc/cpuinfo (engine sidecars and benchmark results record it)."""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

#: the vector / matrix features that change which kernels ONNX Runtime and OpenVINO run
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "f16c")


def cpu_description() -> dict[str, Any]:
    """``{"cpu": model name, "machine": architecture, "cpu_features": [...]}`` of the first processor."""
    name, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name is None:
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {"cpu": name or platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_features": [f for f in CPU_FEATURES if f in flags]}
