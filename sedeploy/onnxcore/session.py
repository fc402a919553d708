"""ONNX Runtime sessions with explicit providers and threads: the one place sessions are made.

Providers are never guessed behind the caller's back. ONNX Runtime itself, asked for CUDAExecutionProvider on a
CPU-only install, only warns and runs on the CPU; here that is an error naming what *is* installed, and after the
session is created the active providers are checked again (a GPU provider that failed to initialise is an error
too). ``providers="auto"`` (the ONNX Runtime runner's default) picks, among the providers this onnxruntime
offers, TensorRT's execution provider, then CUDA, then the CPU — so with onnxruntime-gpu installed the same
artifacts run on the GPU, and on a CPU-only install on the CPU (``auto`` is a request for "what is here", so a GPU
provider that fails to start only warns; a named one is an error).

FP16 Q/DQ graphs (sedeploy's TensorRT INT8 artifact): ORT's ``WeightBiasQuantization`` transformer (basic level)
rewrites the float bias of a Conv fed by two DequantizeLinear nodes into an int32 bias behind a DequantizeLinear
with scale x_scale·w_scale (Div/Round/Mul/Cast nodes appear in the optimized graph). On float16 graphs that
changes the result: on the tiny trained SE-ResNet-18's INT8 TensorRT artifact, top-1 agreement with FP32 is
99.6 % op by op (optimizations off, the graph's ONNX semantics) and with that transformer disabled, but 97.2 %
with it. TensorRT keeps biases in float. So for graphs with float16 Q/DQ scales that transformer is disabled
(:data:`FP16_QDQ_DISABLED_OPTIMIZERS`); the measurement is benchmarks/experiments/trt_artifact_drift.py's
"WeightBiasQuantization on" row.

:func:`cpu_session` is the quiet CPU session used for verification and calibration; :func:`run_model` runs a
batch through a model of any batch layout (a fixed-batch model is run in chunks of its batch).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.fsutil import disk_full_error, short_of_space

log = logging.getLogger("sedeploy")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT_EP, "trt": TENSORRT_EP}
#: Providers that `pip install 'sedeploy[gpu]'` (onnxruntime-gpu) brings.
GPU_PROVIDERS = (TENSORRT_EP, CUDA)
AUTO_ORDER = (TENSORRT_EP, CUDA, CPU)
#: ORT transformers that change what a float16 Q/DQ graph computes (see the module docstring).
FP16_QDQ_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
OPTIMIZATION_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
#: Levels whose saved graph contains CPU-specific NCHWc layout transformations.
MACHINE_SPECIFIC_LEVELS = ("layout", "all")
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def ort_module():
    import onnxruntime

    return onnxruntime


def ort_errors(ort) -> tuple[type[BaseException], ...]:
    """The exception classes ONNX Runtime raises on bad models (they derive from Exception directly).

    They live in ``onnxruntime.capi.onnxruntime_pybind11_state``: ONNX Runtime exports no public alias for them
    (its own Python wrapper and docs catch them there), so this is the one place sedeploy names that module, and
    an ONNX Runtime without one of them just leaves it out."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime package offers, in ORT's priority order."""
    return list(ort_module().get_available_providers())


def default_threads() -> int:
    """All cores this process may use (respects taskset / container CPU affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: the most threads --threads accepts, per core this process may use (more only oversubscribes: 2,000 threads on 2
#: cores took 16 GB of memory and ignored SIGTERM for minutes)
MAX_THREADS_PER_CORE = 4


def check_threads(threads, flag: str = "--threads") -> None:
    """``threads`` (None: the default) must be a whole number from 1 to MAX_THREADS_PER_CORE × the cores here."""
    if threads is None:
        return
    most = MAX_THREADS_PER_CORE * default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most:
        raise SedeployError(f"{flag} {threads} is not valid.",
                            expected=f"a whole number from 1 to {most} ({MAX_THREADS_PER_CORE} per core; this "
                                     f"process may use {default_threads()} core(s))",
                            fix=f"omit {flag} to use every core ({default_threads()})")


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """Turn the user's request into ORT provider names, or explain why it cannot be met.

    None → CPU only. "auto" → TensorRT's provider, then CUDA (those onnxruntime-gpu offers), then CPU. Otherwise a name or a list of names; the short
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
    ort = ort_module()
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
    extra = {}
    if str(optimization).lower() != "disabled" and has_fp16_qdq(source):
        extra["disabled_optimizers"] = list(FP16_QDQ_DISABLED_OPTIMIZERS)
    try:
        session = ort.InferenceSession(source, sess_options=so, providers=chosen, **extra)
    except ort_errors(ort) as err:
        if optimized_model_path is not None:  # ORT writes the optimized graph itself and loses the errno
            need = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
            if short_of_space(Path(optimized_model_path).parent, need):
                raise disk_full_error(optimized_model_path, err) from err
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


def has_fp16_qdq(model: str | bytes) -> bool:
    """Does the model (path or serialized bytes) have a QuantizeLinear/DequantizeLinear with a float16 scale?"""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else \
            onnx.load(model, load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return False  # not a readable model: ONNX Runtime reports that itself, with its own message
    f16 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1 and n.input[1] in f16
               for n in proto.graph.node)


def cpu_session(model, *, threads: int | None = None, optimization: str = "all", quiet: bool = True):
    """A CPU session for a path, serialized bytes or a ModelProto (verification, calibration, smoke runs)."""
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return make_session(model, providers=[CPU], threads=threads, optimization=optimization, quiet=quiet)


def pad_to_batch(x: np.ndarray, batch: int | None) -> np.ndarray:
    """``x`` padded to ``batch`` rows with copies of its last row (unchanged when ``batch`` is None or already
    met). The one place a chunk is made to fit a model with a fixed batch dimension; callers cut the output back
    to ``len(x)`` rows."""
    if batch is None or len(x) >= batch:
        return x
    return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])


def run_model(model_or_session, x: np.ndarray, *, output: int = 0) -> np.ndarray:
    """Output ``output`` of the model on the batch ``x``. A model with a fixed batch dimension is run in chunks of
    that size (a remainder is padded by :func:`pad_to_batch` and cut off again), so every caller can feed any
    number of images to any classifier."""
    sess = model_or_session if hasattr(model_or_session, "get_inputs") else cpu_session(model_or_session)
    inp = sess.get_inputs()[0]
    dim0 = inp.shape[0]
    names = [sess.get_outputs()[output].name]
    if not (isinstance(dim0, int) and dim0 > 0) or dim0 == len(x):
        return sess.run(names, {inp.name: x})[0]
    outs = []
    for start in range(0, len(x), dim0):
        chunk = x[start:start + dim0]
        outs.append(sess.run(names, {inp.name: pad_to_batch(chunk, dim0)})[0][:len(chunk)])
    return np.concatenate(outs)
