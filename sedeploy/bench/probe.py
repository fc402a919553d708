"""Measure this machine's arithmetic ceiling with short GEMM probes.

A throughput figure alone does not say whether an engine is good: 15 img/s may be excellent on two cores and
poor on sixteen. The benchmark therefore reports *achieved* GFLOP/s per engine (the model's total FLOPs per
image × images per second) next to what this machine reaches on the easiest possible workload, a large square
matrix multiply:

- **fp32**: the *best* of several fp32 GEMM kernels on the same threads — ``torch.matmul`` (torch's intra-op
  threads set for the probe only), ONNX Runtime ``MatMul`` and, where it is installed, OpenVINO's ``MatMul`` (the
  kernels OpenVINO's own FP32 engines run). One library's GEMM is not the machine's limit: on a 2-core Xeon an
  OpenVINO FP32 engine measured 176 % of a torch-only ceiling. Each kernel's figure is kept (``kernels``), and
  the ISA's own bound (:func:`sedeploy.machine.fp32_isa_peak`: vector lanes × FMA pipes × clock × threads, from
  /proc/cpuinfo) is reported beside it (``isa_peak``) for context.
- **int8**: ONNX Runtime ``MatMulInteger`` with uint8 activations × int8 weights (u8s8), the kernel family ORT's
  quantized Conv/MatMul use on x86. The weights are a graph initializer, as in a real model, so ORT may prepack
  them. The graph is built with ``onnx.helper``; it computes int32 accumulators (no requantisation), which is the
  int8 GEMM ceiling proper. The weights are 7-bit (−64…63), as ORT's quantizer writes them with
  ``reduce_range=True``: on x86 CPUs without VNNI the u8s8 kernel adds pairs of u8·s8 products in int16
  (``vpmaddubsw``), which saturates with full-range weights and returns wrong sums. Speed is the same either
  way; 7-bit weights keep the probe's product exact, so it measures a computation worth doing.

Each probe runs a few warm-up calls, then times calls for about its share of ``seconds``. A kernel's figure is
taken from its *best* call: a ceiling is what the machine can reach, and on a shared, noisy machine the median of
a short probe drifts with other tenants' load (medians of 90 and 160 GFLOP/s were seen twenty minutes apart on the
same VM) while the best call barely moves. The median is reported too. One multiply-add counts as 2 operations, as
in :mod:`sedeploy.flops`. A measured ceiling is still only what these GEMMs reach: an engine whose kernels do
better (or do fewer operations than the FLOP count says, e.g. Winograd convolutions) shows above 100 %, and the
report then says the ceiling is unreliable for it — nothing is clamped. The figures describe the CPU: they are not
a ceiling for GPU engines.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from sedeploy.backends.openvino_support import compile_config
from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.machine import fp32_isa_peak
from sedeploy.onnxcore import cpu_session

log = logging.getLogger("sedeploy")

__all__ = ["probe_fp32_gemm", "probe_fp32_gemm_ort", "probe_fp32_gemm_openvino", "probe_int8_gemm", "machine_ceilings",
           "ceiling_kind", "int8_matmul_model", "fp32_matmul_model"]


def _time_calls(fn: Callable[[], Any], *, seconds: float, warmup: int, min_calls: int,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = clock()
    while len(samples) < min_calls or clock() - start < seconds:
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return samples


def _summary(kind: str, ops_per_call: float, samples: list[float], **extra) -> dict[str, Any]:
    med, best = float(np.median(samples)), float(np.min(samples))
    unit = "GFLOP/s" if kind == "fp32" else "GOP/s"
    return {"kind": kind, "unit": unit, "per_s": ops_per_call / best / 1e9, "median_per_s": ops_per_call / med / 1e9,
            "ops_per_call": ops_per_call, "calls": len(samples), "median_ms": med * 1e3, "best_ms": best * 1e3,
            **extra}


def _check(size: int, threads: int, seconds: float) -> None:
    if size < 16:
        raise SedeployError(f"GEMM probe size {size} is too small to measure a ceiling.",
                            expected="a square size ≥ 16 (1024 is the default)")
    if threads < 1:
        raise SedeployError(f"GEMM probe threads = {threads}.", expected="1 or more threads")
    if seconds <= 0:
        raise SedeployError(f"GEMM probe duration {seconds} s.", expected="a positive number of seconds")


def probe_fp32_gemm(size: int = 1024, *, threads: int = 2, seconds: float = 1.0, warmup: int = 3,
                    min_calls: int = 5) -> dict[str, Any]:
    """float32 ``size``×``size`` @ ``size``×``size`` with torch on ``threads`` threads → GFLOP/s."""
    _check(size, threads, seconds)
    try:
        import torch
    except ImportError as err:
        raise MissingDependencyError("torch", "dev", "The fp32 GEMM probe") from err
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        out = torch.empty(size, size)
        with torch.inference_mode():
            samples = _time_calls(lambda: torch.matmul(a, b, out=out), seconds=seconds, warmup=warmup,
                                  min_calls=min_calls)
    finally:
        torch.set_num_threads(previous)
    return _summary("fp32", 2.0 * size ** 3, samples, shape=[size, size, size], threads=threads,
                    method=f"torch {torch.__version__} matmul float32")


def int8_matmul_model(size: int, seed: int = 0):
    """The int8 GEMM probe's graph: one ``MatMulInteger`` of a uint8 ``size``×``size`` input ``a`` (zero point
    128) with a constant 7-bit int8 weight ``w`` drawn from ``seed`` (zero point 0) → int32 ``y``, so the product
    is exact on every x86 CPU (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.integers(-64, 64, (size, size), dtype=np.int8)  # 7-bit: exact on AVX2 u8s8 (module docstring)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"])],
        "sedeploy_int8_gemm_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        initializer=[numpy_helper.from_array(weight, "w"),
                     numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
                     numpy_helper.from_array(np.array(0, np.int8), "w_zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="sedeploy")
    model.ir_version = 8  # readable by every onnxruntime sedeploy supports
    onnx.checker.check_model(model)
    return model


def probe_int8_gemm(size: int = 1024, *, threads: int = 2, seconds: float = 1.0, warmup: int = 3,
                    min_calls: int = 5) -> dict[str, Any]:
    """uint8 × int8 → int32 ``MatMulInteger`` in ONNX Runtime (CPU, ``threads`` intra-op threads) → GOP/s."""
    _check(size, threads, seconds)
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MissingDependencyError("onnxruntime", "dev", "The int8 GEMM probe") from err

    session = cpu_session(int8_matmul_model(size), threads=threads)
    a = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
    feed = {"a": a}
    samples = _time_calls(lambda: session.run(["y"], feed), seconds=seconds, warmup=warmup, min_calls=min_calls)
    return _summary("int8", 2.0 * size ** 3, samples, shape=[size, size, size], threads=threads,
                    method=f"onnxruntime {ort.__version__} MatMulInteger u8s8 (CPU)")


def fp32_matmul_model(size: int, seed: int = 0):
    """The fp32 GEMM probe's graph: one ``MatMul`` of a float32 ``size``×``size`` input ``a`` with a constant
    standard-normal weight ``w`` drawn from ``seed`` → ``y``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((size, size)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "sedeploy_fp32_gemm_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="sedeploy")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def probe_fp32_gemm_ort(size: int = 1024, *, threads: int = 2, seconds: float = 1.0, warmup: int = 3,
                        min_calls: int = 5) -> dict[str, Any]:
    """float32 ``MatMul`` (weights an initializer) in ONNX Runtime on ``threads`` intra-op threads → GFLOP/s."""
    _check(size, threads, seconds)
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MissingDependencyError("onnxruntime", "dev", "The fp32 GEMM probe") from err

    session = cpu_session(fp32_matmul_model(size), threads=threads)
    feed = {"a": np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)}
    samples = _time_calls(lambda: session.run(["y"], feed), seconds=seconds, warmup=warmup, min_calls=min_calls)
    return _summary("fp32", 2.0 * size ** 3, samples, shape=[size, size, size], threads=threads,
                    method=f"onnxruntime {ort.__version__} MatMul float32 (CPU)")


def probe_fp32_gemm_openvino(size: int = 1024, *, threads: int = 2, seconds: float = 1.0, warmup: int = 3,
                             min_calls: int = 5) -> dict[str, Any] | None:
    """float32 ``MatMul`` compiled by OpenVINO for the CPU (f32 precision hint, ``threads`` threads, as sedeploy's
    OpenVINO engines are compiled) → GFLOP/s; None when OpenVINO is not installed (it is optional)."""
    _check(size, threads, seconds)
    try:
        import openvino as ov
    except ImportError:
        return None
    import tempfile
    from pathlib import Path

    import onnx

    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="sedeploy-probe-") as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(fp32_matmul_model(size), str(path))
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      compile_config(threads=threads, precision_hint="f32"))
    request = compiled.create_infer_request()
    a = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
    samples = _time_calls(lambda: request.infer([a]), seconds=seconds, warmup=warmup, min_calls=min_calls)
    return _summary("fp32", 2.0 * size ** 3, samples, shape=[size, size, size], threads=threads,
                    method=f"openvino {ov.__version__} MatMul f32 (CPU)")


def machine_ceilings(*, size: int = 1024, threads: int = 2, seconds: float = 2.0) -> dict[str, dict[str, Any]]:
    """The probes: ``{"fp32": {...}, "int8": {...}}`` (``per_s`` is the ceiling). fp32 is the best of the fp32
    kernels (each one's figure under ``kernels``, the ISA bound under ``isa_peak``); they share ``seconds``."""
    share = max(seconds / 3, 0.5)
    kernels = [probe_fp32_gemm(size, threads=threads, seconds=share),
               probe_fp32_gemm_ort(size, threads=threads, seconds=share)]
    if (ov_probe := probe_fp32_gemm_openvino(size, threads=threads, seconds=share)) is not None:
        kernels.append(ov_probe)
    best = max(kernels, key=lambda k: k["per_s"])
    fp32 = {**best, "kernels": [{k: v[k] for k in ("method", "per_s", "median_per_s", "calls")} for v in kernels],
            "isa_peak": fp32_isa_peak(threads)}
    int8 = probe_int8_gemm(size, threads=threads, seconds=seconds)
    for probe in (fp32, int8):
        if not (np.isfinite(probe["per_s"]) and probe["per_s"] > 0):
            raise SedeployError(f"The {probe['kind']} GEMM probe measured {probe['per_s']} {probe['unit']}.",
                                expected="a positive, finite rate", fix="run bench with --no-probe")
    log.info("Machine ceiling (%d threads, %d³ GEMM): fp32 %.0f GFLOP/s (%s), int8 %.0f GOP/s",
             threads, size, fp32["per_s"], fp32["method"], int8["per_s"])
    return {"fp32": fp32, "int8": int8}


def ceiling_kind(precision: str, device: str = "cpu") -> str | None:
    """Which CPU ceiling an engine is compared with: int8 → "int8"; fp32 and fp16 → "fp32" (ONNX Runtime's CPU
    provider runs FP16 graphs through Casts in fp32); anything not on the CPU → None (no CPU ceiling applies)."""
    if device != "cpu":
        return None
    return "int8" if precision == "int8" else "fp32" if precision in ("fp32", "fp16") else None
