"""What CPU this is: the one reader of /proc/cpuinfo (engine sidecars and benchmark results record it)."""
from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Any

from sedeploy.errors import SedeployError

#: the vector / matrix features that change which kernels ONNX Runtime and OpenVINO run
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "f16c")


def _cpuinfo() -> tuple[str | None, set[str], float | None]:
    """(model name, flags, clock in MHz) of the first processor in /proc/cpuinfo; (None, set(), None) without it."""
    name, flags, mhz = None, set(), None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name is None:
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and mhz is None:
                with contextlib.suppress(ValueError):
                    mhz = float(value)
    return name, flags, mhz


def cpu_description() -> dict[str, Any]:
    """``{"cpu": model name, "machine": architecture, "cpu_features": [...]}`` of the first processor."""
    name, flags, _ = _cpuinfo()
    return {"cpu": name or platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def fp32_isa_peak(threads: int) -> dict[str, Any] | None:
    """What the vector ISA allows in fp32 on ``threads`` cores at the clock /proc/cpuinfo (or cpufreq's maximum)
    reports: float32 lanes × 2 (a fused multiply-add is 2 operations) × 2 FMA units per core × clock × threads.

    An estimate, not a measurement: it assumes two FMA pipes per core (most server cores since Haswell / Zen 2;
    some parts have one AVX-512 pipe, which halves it), one thread per physical core, and the clock reported
    (a virtual machine reports its nominal clock; turbo can exceed it). None where no clock is readable."""
    _, flags, mhz = _cpuinfo()
    with contextlib.suppress(OSError, ValueError):  # the highest clock the core may run at, where the kernel knows
        mhz = max(mhz or 0.0, int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e3)
    if not mhz:
        return None
    if "avx512f" in flags:
        isa, lanes, fma = "AVX-512", 16, 2
    elif "avx2" in flags and "fma" in flags:
        isa, lanes, fma = "AVX2+FMA", 8, 2
    elif "avx" in flags:
        isa, lanes, fma = "AVX (no FMA: one add and one multiply pipe)", 8, 1
    else:
        isa, lanes, fma = "SSE", 4, 1
    per_cycle = lanes * 2 * fma
    return {"isa": isa, "flops_per_cycle_per_core": per_cycle, "mhz": mhz, "threads": threads,
            "per_s": per_cycle * mhz * 1e6 * threads / 1e9, "unit": "GFLOP/s",
            "assumes": "2 FMA pipes per core, one thread per physical core, the reported clock"}


def check_omp_num_threads() -> None:
    """Refuse an ``OMP_NUM_THREADS`` OpenMP cannot use (``0``, negative, not a number) before any library reads it.

    PyTorch and other OpenMP users then fall back to behaviour of their own: with ``OMP_NUM_THREADS=0`` a
    PyTorch FP32 baseline ran 13× slower than with the variable unset, and a benchmark would report that as the
    baseline's speed. Unset or empty, or a positive number (OpenMP's nested form ``4,2`` too), is accepted."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None or not value.strip() or re.fullmatch(r"\s*[1-9][0-9]*\s*(,\s*[1-9][0-9]*\s*)*", value):
        return

    raise SedeployError(f"The environment variable OMP_NUM_THREADS={value!r} is not valid.",
                        expected="unset, or a positive whole number of threads (e.g. 2)",
                        fix="unset OMP_NUM_THREADS (sedeploy sets each library's threads itself; see --threads), "
                            "or set it to a positive number")
