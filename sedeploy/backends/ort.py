"""ONNX Runtime backend: sessions with explicit providers and threads, a runner, and the ORT "engine".

Providers are never guessed behind the caller's back. ONNX Runtime itself, asked for CUDAExecutionProvider on a
CPU-only install, only warns and runs on the CPU; here that is an error naming what *is* installed, and after the
session is created the active providers are checked again (a GPU provider that was asked for by name and failed to
initialise is an error too; under ``"auto"`` it is a warning naming it, and the session runs on what started).
The runner's default is ``providers="auto"``: TensorRT's execution provider, then CUDA, when
onnxruntime-gpu offers them, else the CPU — the same artifacts run on the GPU where onnxruntime-gpu is installed
(ORT's TensorRT provider builds engines of its own at session creation: minutes for SE-ResNet-50; pass
``providers="cuda"`` to skip it). The saved ORT "engine" is always made on the CPU provider.

FP16: ONNX Runtime's CPU provider has no FP16 convolution kernels on x86-64. Given an FP16 graph, it runs FP32
kernels: at level "all" its optimizer folds the FP16 weights to FP32 (the optimized graph holds no FP16 tensor), at
lower levels it inserts Casts to FP32 before them; measured on SE-ResNet-50, the logits match an FP32 graph with
FP16-rounded weights to within 1e-6 of the largest logit (levels "all" and "disabled"). So an "FP16 engine"
saved from it would compute in FP32. :func:`cpu_computes_fp16` probes this once per process;
where it is False, :func:`unsupported_here` says why, ``build-engine`` writes the FP16 artifact without an ORT
engine, and :func:`build_ort_engine` refuses an FP16 source rather than label an FP32 engine FP16. The FP16
artifact's drift is verified on the CPU with :func:`sedeploy.fp16_verify.fp16_emulation` instead.

ORT's "engine" (:func:`build_ort_engine`) is the graph after ORT's optimizations, saved to disk, so that loading
it skips the optimization work and so that what runs can be inspected. At level "all" (and "layout") the saved
graph is machine specific: convolutions are rewritten to ORT's blocked NCHWc layout (``com.microsoft.nchwc``
ops) whose block size follows this CPU's vector width (8 floats for AVX2, 16 for AVX-512). Such a file still
loads on other x86-64 CPUs, but is tuned for, and only verified on, the kind of machine that produced it; the
sidecar says so. Level "extended" gives a portable file.
"""
from __future__ import annotations

import functools
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy import __version__
from sedeploy.backends import Engine, EngineOptions, Runner, validate_input, write_sidecar
from sedeploy.errors import SedeployError
from sedeploy.machine import cpu_description
from sedeploy.fsutil import atomic_path, ensure_writable_dir
from sedeploy.layout import engine_paths
from sedeploy.onnxcore import as_model, graph_precision, holds_fp16_tensors, sha256_file
from sedeploy.onnxcore.session import (CPU, MACHINE_SPECIFIC_LEVELS, NUMPY_TYPES, default_threads, make_session,
                                       ort_module)


class OrtRunner(Runner):
    """Runs one ONNX file in ONNX Runtime; ``infer(x)`` returns the first output as a numpy array."""

    backend = "ort"
    timer_coverage = "ONNX Runtime session.run: host numpy batch in → host numpy logits out"

    def __init__(self, path: str | Path, *, providers: str | Sequence[str] | None = "auto",
                 threads: int | None = None, optimization: str = "all"):
        super().__init__(path)
        if not self.path.is_file():
            raise SedeployError(f"The ONNX file '{self.path}' does not exist.", fix="check the path")
        self.providers_requested = providers
        self.threads = threads if threads is not None else default_threads()
        self.optimization = optimization
        self.session = None

    def _activate(self) -> None:
        self.session = make_session(self.path, providers=self.providers_requested, threads=self.threads,
                                    optimization=self.optimization)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise SedeployError(f"'{self.path}' has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}).",
                                expected="one image-batch input, as sedeploy exports")
        if inputs[0].type not in NUMPY_TYPES:
            raise SedeployError(f"'{self.path}' takes {inputs[0].type}, which sedeploy's runners do not feed.",
                                expected=f"one of {', '.join(NUMPY_TYPES)}")
        self.input_name = inputs[0].name
        self.input_shape = [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape]
        self.input_dtype = np.dtype(NUMPY_TYPES[inputs[0].type])
        self.output_name = outputs[0].name

    def _infer(self, x: np.ndarray) -> np.ndarray:
        x = validate_input(x, name=self.input_name, dtype=self.input_dtype, shape=self.input_shape,
                           engine=f"ONNX Runtime ({self.path.name})")
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def _deactivate(self) -> None:
        self.session = None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def runs_on(self) -> str:
        return "cpu" if self.providers[:1] in ([], [CPU]) else "cuda"

    def precision_note(self) -> str | None:
        if self.providers != [CPU] or unsupported_here("fp16") is None or not holds_fp16_tensors(self.path):
            return None
        if graph_precision(self.path) == "fp16":
            return (f"{self.path.name} is an FP16 graph run by ONNX Runtime's CPU provider, which computes it in FP32 "
                    "with its weights rounded to FP16: its time is not FP16 time, and its drift shows the weight "
                    "rounding only (FP16 activations are not rounded here)")
        return (f"{self.path.name} holds FP16 parts (Q/DQ inside an FP16 graph: the TensorRT form), which ONNX "
                "Runtime's CPU provider computes in FP32: its time and drift are not those of the engine it is for")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"onnxruntime_version": ort_module().__version__, "optimization": self.optimization,
                  "intra_op_threads": self.threads, "inter_op_threads": 1})
        if self.session is not None:
            d["providers"] = self.session.get_providers()
            d["output"] = self.output_name
        return d


def op_histogram(model) -> dict[str, int]:
    """Node count per op type, most frequent first; ops outside the default domain read ``domain:OpType``."""
    proto, _ = as_model(model, weights=False)
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                     for n in proto.graph.node)
    return dict(counts.most_common())


def optimized_model(model, level: str = "all", threads: int = 1):
    """The graph ORT actually runs at ``level`` on the CPU (its optimized model, saved to a temporary file and
    loaded back as a ModelProto); ``model`` is a path or serialized bytes."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="sedeploy-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(model, providers=[CPU], threads=threads, optimization=level, optimized_model_path=out,
                     quiet=True)
        return onnx.load(str(out))


def optimized_graph_histogram(path: str | Path, level: str = "all", threads: int = 1) -> dict[str, int]:
    """Op histogram of :func:`optimized_model`. This is where the NCHWc ``ReorderInput`` / ``ReorderOutput``
    conversions around SE blocks become visible: ORT keeps the SE squeeze (ReduceMean) and scale (Mul) in plain
    NCHW."""
    return op_histogram(optimized_model(path, level, threads))


@functools.cache
def cpu_computes_fp16() -> bool:
    """Whether ONNX Runtime's CPU provider has an FP16 convolution kernel on this machine: probed once on a
    one-Conv FP16 graph optimized at level "all" (its weight stays float16 only where an FP16 kernel runs; at lower
    levels ORT keeps the weight and inserts a Cast to FP32 before an FP32 kernel instead, so the level-"all" answer
    holds for every level)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((8, 8, 1, 1), 0.125, dtype=np.float16), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "fp16_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return holds_fp16_tensors(optimized_model(model.SerializeToString(), "all"))


#: why an FP16 graph gets no ORT engine where :func:`cpu_computes_fp16` is False
NO_FP16_KERNELS = ("ONNX Runtime's CPU provider has no FP16 convolution kernels on this CPU: it folds an FP16 "
                   "graph's weights to FP32 and runs FP32 kernels, so the engine would compute in FP32, a precision "
                   "change sedeploy does not make silently")


def unsupported_here(precision: str) -> str | None:
    """Why ONNX Runtime cannot run a graph of ``precision`` in that precision on this machine (None when it can).
    The saved ORT engine is always made on the CPU provider, so this asks the CPU."""
    if precision == "fp16" and not cpu_computes_fp16():
        return NO_FP16_KERNELS
    return None


def build_engine(onnx_path: str | Path, out_dir: str | Path, options: EngineOptions | None = None, *,
                 source_as: str | Path | None = None) -> Engine:
    """The backend-table entry point: :func:`build_ort_engine` with the options that concern ONNX Runtime."""
    options = options or EngineOptions()
    return build_ort_engine(onnx_path, out_dir, threads=options.threads, source_as=source_as)


def build_ort_engine(onnx_path: str | Path, out_dir: str | Path, *, threads: int | None = None,
                     providers: str | Sequence[str] | None = None, optimization: str = "all",
                     source_as: str | Path | None = None) -> Engine:
    """Save ORT's optimized graph of ``onnx_path`` as ``<stem>.ort-opt.onnx`` plus ``<stem>.ort.json``.

    ORT writes the optimized model itself (``SessionOptions.optimized_model_filepath``), so it is pointed at a
    temporary name in ``out_dir`` that is renamed into place only once the session was created and the file read
    back. At levels "all" / "layout" the result is specific to this CPU's vector width (see the module docstring).
    ``source_as``: the path the sidecar records as the engine's source (where the artifact is published, when it is
    built in a staging folder; default: the artifact's path).
    """
    ort = ort_module()
    src = Path(onnx_path)
    if not src.is_file():
        raise SedeployError(f"The ONNX file '{src}' does not exist.", fix="check the path")
    if graph_precision(src) == "fp16" and unsupported_here("fp16") is not None:
        raise SedeployError(f"No ONNX Runtime engine is built from '{src}' (an FP16 graph): {NO_FP16_KERNELS}.",
                            expected="an FP32 or INT8 artifact (or an FP16 one on a provider with FP16 kernels)",
                            fix="build the ORT engine from the .fp32.onnx or .int8-cpu.onnx artifact; the "
                                ".fp16.onnx artifact is for TensorRT (sedeploy build-engine --backend trt)")
    out = ensure_writable_dir(out_dir)
    final, sidecar = engine_paths(out, src, "ort")
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
        "backend": "ort", "sedeploy_version": __version__, "onnxruntime_version": ort.__version__,
        "providers": active, "optimization": str(optimization).lower(), "intra_op_threads": threads_used,
        "precision": precision, "source_model": str(source_as or src), "source_sha256": sha256_file(src),
        "engine_sha256": sha256_file(final), "nchwc_nodes": nchwc, "op_histogram": histogram,
        "machine_specific": machine_specific, **cpu_description(),
        "note": ("optimized for this CPU's vector width (NCHWc blocking); it loads on other x86-64 CPUs but is "
                 "tuned and verified for this kind of machine only; rebuild per machine, or use "
                 "optimization 'extended' for a portable file") if machine_specific else
                "portable: no layout transformations",
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    try:
        write_sidecar(sidecar, metadata)
    except BaseException:
        final.unlink(missing_ok=True)  # an engine without its sidecar is not published,
        sidecar.unlink(missing_ok=True)  # and a previous engine's sidecar would describe a file that is gone
        raise
    return Engine(path=final, sidecar=sidecar, backend="ort", precision=precision, source=Path(source_as or src),
                  metadata=metadata)
