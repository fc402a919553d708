"""ONNX Runtime backend: sessions with explicit providers and threads, a runner, and the ORT "engine".

Providers are never guessed behind the caller's back. ONNX Runtime itself, asked for CUDAExecutionProvider on a
CPU-only install, only warns and runs on the CPU; here that is an error naming what *is* installed, and after the
session is created the active providers are checked again (a GPU provider that failed to initialise is an error
too). ``providers="auto"`` picks CUDA first when onnxruntime-gpu is installed, then the CPU. ORT's TensorRT
execution provider is used only when named: it builds TensorRT engines of its own at session creation (minutes),
and sedeploy has a TensorRT backend of its own (:mod:`sedeploy.backends.tensorrt`).

ORT's "engine" (:func:`build_ort_engine`) is the graph after ORT's optimizations, saved to disk, so that loading
it skips the optimization work and so that what runs can be inspected. At level "all" (and "layout") the saved
graph is machine specific: convolutions are rewritten to ORT's blocked NCHWc layout (``com.microsoft.nchwc``
ops) whose block size follows this CPU's vector width (8 floats for AVX2, 16 for AVX-512). Such a file still
loads on other x86-64 CPUs, but is tuned for, and only verified on, the kind of machine that produced it; the
sidecar says so. Level "extended" gives a portable file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.backends import EngineArtifact, graph_precision, validate_input, write_sidecar
from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_path, ensure_writable_dir

log = logging.getLogger("sedeploy")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT_EP, "trt": TENSORRT_EP}
#: Providers that `pip install 'sedeploy[gpu]'` (onnxruntime-gpu) brings.
GPU_PROVIDERS = (TENSORRT_EP, CUDA)
AUTO_ORDER = (CUDA, CPU)
OPTIMIZATION_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
#: Levels whose saved graph contains CPU-specific NCHWc layout transformations.
MACHINE_SPECIFIC_LEVELS = ("layout", "all")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _ort():
    import onnxruntime

    return onnxruntime


def _ort_errors(ort) -> tuple[type[BaseException], ...]:
    """The exception classes ONNX Runtime raises on bad models (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime package offers, in ORT's priority order."""
    return list(_ort().get_available_providers())


def default_threads() -> int:
    """All cores this process may use (respects taskset / container CPU affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """Turn the user's request into ORT provider names, or explain why it cannot be met.

    None → CPU only. "auto" → CUDA (when installed) then CPU. Otherwise a name or a list of names; the short
    forms "cpu", "cuda", "tensorrt" are accepted. The CPU provider is appended when absent: ORT places the nodes
    a GPU provider cannot run on it (per-node placement, not a fallback of the whole model).
    """
    available = available_providers()
    if providers is None:
        return [CPU]
    if isinstance(providers, str) and providers.lower() == "auto":
        return [p for p in AUTO_ORDER if p in available]
    requested = [providers] if isinstance(providers, str) else list(providers)
    if not requested:
        raise SedeployError("An empty provider list was given.", expected=_allowed(available), fix="pass cpu")
    names = [PROVIDER_ALIASES.get(p.lower(), p) if isinstance(p, str) else p for p in requested]
    for name in names:
        if name in available:
            continue
        if name in GPU_PROVIDERS:
            raise SedeployError(
                f"The ONNX Runtime provider '{name}' is not installed here; this onnxruntime offers: "
                f"{', '.join(available)}.",
                fix="pip install 'sedeploy[gpu]' (onnxruntime-gpu; uninstall the CPU-only 'onnxruntime' package "
                    "first, both provide the same module), or run with providers cpu")
        raise SedeployError(f"Unknown ONNX Runtime provider {name!r}.", expected=_allowed(available),
                            fix="pass one of the providers listed")
    return names if CPU in names else [*names, CPU]


def _allowed(available: list[str]) -> str:
    return f"one of {', '.join(available)} (short forms: cpu, cuda, tensorrt), or 'auto'"


def _optimization_level(ort, optimization: str):
    key = OPTIMIZATION_LEVELS.get(str(optimization).lower())
    if key is None or not hasattr(ort.GraphOptimizationLevel, key):
        offered = [k for k, v in OPTIMIZATION_LEVELS.items() if hasattr(ort.GraphOptimizationLevel, v)]
        raise SedeployError(f"Unknown ONNX Runtime optimization level {optimization!r}.",
                            expected=f"one of {', '.join(offered)}", fix="pass all (the default)")
    return getattr(ort.GraphOptimizationLevel, key)


def make_session(model, *, providers: str | Sequence[str] | None = None, threads: int | None = None,
                 optimization: str = "all", optimized_model_path: str | Path | None = None, quiet: bool = False):
    """An ``onnxruntime.InferenceSession`` for ``model`` (a path or serialized bytes), configured explicitly.

    ``threads`` sets intra-op parallelism (default: all cores) with inter-op 1: SE-ResNet is a chain, so a second
    pool only competes for the same cores. ``optimized_model_path`` makes ORT save its optimized graph there.
    ``quiet`` hides ORT's own warnings (used where sedeploy reports the same thing itself).
    """
    ort = _ort()
    chosen = resolve_providers(providers)
    if threads is None:
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SedeployError(f"Thread count {threads!r} is not valid.", expected="a positive integer",
                            fix=f"pass --threads {default_threads()} (all cores here), or omit it")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = _optimization_level(ort, optimization)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if quiet:
        so.log_severity_level = 3  # errors only
    if isinstance(model, (bytes, bytearray)):
        source, label = bytes(model), "<model bytes>"
    else:
        path = Path(model)
        if not path.is_file():
            raise SedeployError(f"The ONNX file '{path}' does not exist.", fix="check the path")
        source, label = str(path), str(path)
    try:
        session = ort.InferenceSession(source, sess_options=so, providers=chosen)
    except _ort_errors(ort) as err:
        raise SedeployError(f"ONNX Runtime could not load '{label}': {err}",
                            fix="check that the file is a complete ONNX model (onnx.checker.check_model)") from err
    active = session.get_providers()
    dropped = [p for p in chosen if p not in active]
    if dropped and isinstance(providers, str) and providers.lower() == "auto":
        log.warning("ONNX Runtime could not start %s; running on %s.", ", ".join(dropped), ", ".join(active))
    elif dropped:
        raise SedeployError(
            f"ONNX Runtime did not start the requested provider(s) {', '.join(dropped)} for '{label}'; the session "
            f"runs on {', '.join(active)} only (ORT's log above says why).",
            fix="check the CUDA / cuDNN installation that onnxruntime-gpu needs (nvidia-smi; see ORT's CUDA "
                "requirements table), or run with providers cpu")
    return session


class OrtRunner:
    """Runs one ONNX file in ONNX Runtime; ``run(x)`` returns the first output as a numpy array."""

    def __init__(self, path: str | Path, *, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, optimization: str = "all"):
        self.path = Path(path)
        self.threads = threads if threads is not None else default_threads()
        self.optimization = optimization
        self.session = make_session(self.path, providers=providers, threads=self.threads,
                                    optimization=optimization)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise SedeployError(f"'{self.path}' has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}).",
                                expected="one image-batch input, as sedeploy exports")
        self.input_name: str = inputs[0].name
        self.input_shape: list = list(inputs[0].shape)
        if inputs[0].type not in _NUMPY_TYPES:
            raise SedeployError(f"'{self.path}' takes {inputs[0].type}, which sedeploy's runners do not feed.",
                                expected=f"one of {', '.join(_NUMPY_TYPES)}")
        self.input_dtype = np.dtype(_NUMPY_TYPES[inputs[0].type])
        self.output_name: str = outputs[0].name

    @property
    def providers(self) -> list[str]:
        return self._session().get_providers()

    def _session(self):
        if self.session is None:
            raise SedeployError(f"The ONNX Runtime runner for '{self.path}' is closed.",
                                fix="create a new OrtRunner, or call run() inside its `with` block")
        return self.session

    def run(self, x: np.ndarray) -> np.ndarray:
        session = self._session()
        x = validate_input(x, name=self.input_name, dtype=self.input_dtype, shape=self.input_shape,
                           engine=f"ONNX Runtime ({self.path.name})")
        return session.run([self.output_name], {self.input_name: x})[0]

    def describe(self) -> dict[str, Any]:
        session = self._session()
        so = session.get_session_options()
        return {"backend": "onnxruntime", "onnxruntime_version": _ort().__version__, "path": str(self.path),
                "providers": session.get_providers(), "intra_op_threads": so.intra_op_num_threads,
                "inter_op_threads": so.inter_op_num_threads, "optimization": self.optimization,
                "input": self.input_name, "input_shape": self.input_shape, "input_dtype": self.input_dtype.name,
                "output": self.output_name}

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def op_histogram(model) -> dict[str, int]:
    """Node count per op type, most frequent first; ops outside the default domain read ``domain:OpType``."""
    from sedeploy.backends import _load_proto

    proto = _load_proto(model)
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                     for n in proto.graph.node)
    return dict(counts.most_common())


def optimized_graph_histogram(path: str | Path, level: str = "all", threads: int = 1) -> dict[str, int]:
    """Op histogram of the graph ORT actually runs at ``level`` on the CPU (its optimized model, saved to a
    temporary file). This is where the NCHWc ``ReorderInput`` / ``ReorderOutput`` conversions around SE blocks
    become visible: ORT keeps the SE squeeze (ReduceMean) and scale (Mul) in plain NCHW."""
    with tempfile.TemporaryDirectory(prefix="sedeploy-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(path, providers=[CPU], threads=threads, optimization=level, optimized_model_path=out,
                     quiet=True)
        return op_histogram(out)


def _cpu_description() -> dict[str, Any]:
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    features = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return {"cpu": name, "machine": platform.machine(), "cpu_features": features}


def build_ort_engine(onnx_path: str | Path, out_dir: str | Path, *, threads: int | None = None,
                     providers: str | Sequence[str] | None = None, optimization: str = "all") -> EngineArtifact:
    """Save ORT's optimized graph of ``onnx_path`` as ``<stem>.ort-opt.onnx`` plus ``<stem>.ort.json``.

    ORT writes the optimized model itself (``SessionOptions.optimized_model_filepath``), so it is pointed at a
    temporary name in ``out_dir`` that is renamed into place only once the session was created and the file read
    back. At levels "all" / "layout" the result is specific to this CPU's vector width (see the module docstring).
    """
    from sedeploy import __version__
    from sedeploy.export import sha256_file

    ort = _ort()
    src = Path(onnx_path)
    if not src.is_file():
        raise SedeployError(f"The ONNX file '{src}' does not exist.", fix="check the path")
    out = ensure_writable_dir(out_dir)
    final, sidecar = out / f"{src.stem}.ort-opt.onnx", out / f"{src.stem}.ort.json"
    if final.resolve() == src.resolve():
        raise SedeployError(f"Building into '{out}' would overwrite the source model '{src}'.",
                            fix="choose another output directory")
    t0 = time.perf_counter()
    with atomic_path(final) as tmp:
        session = make_session(src, providers=providers, threads=threads, optimization=optimization,
                               optimized_model_path=tmp, quiet=True)
        if tmp.stat().st_size == 0:
            raise SedeployError(f"ONNX Runtime {ort.__version__} did not write the optimized model of '{src}'.")
        histogram = op_histogram(tmp)
        precision = graph_precision(tmp)
        active = session.get_providers()
        threads_used = session.get_session_options().intra_op_num_threads
    machine_specific = str(optimization).lower() in MACHINE_SPECIFIC_LEVELS
    nchwc = sum(n for op, n in histogram.items() if op.startswith("com.microsoft.nchwc:"))
    metadata = {
        "backend": "onnxruntime", "sedeploy_version": __version__, "onnxruntime_version": ort.__version__,
        "providers": active, "optimization": str(optimization).lower(), "intra_op_threads": threads_used,
        "precision": precision, "source_model": str(src), "source_sha256": sha256_file(src),
        "engine_sha256": sha256_file(final), "nchwc_nodes": nchwc, "op_histogram": histogram,
        "machine_specific": machine_specific, **_cpu_description(),
        "note": ("optimized for this CPU's vector width (NCHWc blocking); it loads on other x86-64 CPUs but is "
                 "tuned and verified for this kind of machine only; rebuild per machine, or use "
                 "optimization 'extended' for a portable file") if machine_specific else
                "portable: no layout transformations",
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    try:
        write_sidecar(sidecar, metadata)
    except BaseException:
        final.unlink(missing_ok=True)  # an engine without its sidecar is not published
        raise
    return EngineArtifact(path=final, sidecar=sidecar, backend="onnxruntime", precision=precision,
                          metadata=metadata)
