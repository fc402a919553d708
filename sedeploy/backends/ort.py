"""ONNX Runtime backend: sessions with explicit providers and threads, a runner, and the ORT "engine".

Providers are never guessed behind the caller's back. ONNX Runtime itself, asked for CUDAExecutionProvider on a
CPU-only install, only warns and runs on the CPU; here that is an error naming what *is* installed, and after the
session is created the active providers are checked again (a GPU provider that failed to initialise is an error
too). The runner's default is ``providers="auto"``: TensorRT's execution provider, then CUDA, when
onnxruntime-gpu offers them, else the CPU — the same artifacts run on the GPU where onnxruntime-gpu is installed
(ORT's TensorRT provider builds engines of its own at session creation: minutes for SE-ResNet-50; pass
``providers="cuda"`` to skip it). The saved ORT "engine" is always made on the CPU provider.

ORT's "engine" (:func:`build_ort_engine`) is the graph after ORT's optimizations, saved to disk, so that loading
it skips the optimization work and so that what runs can be inspected. At level "all" (and "layout") the saved
graph is machine specific: convolutions are rewritten to ORT's blocked NCHWc layout (``com.microsoft.nchwc``
ops) whose block size follows this CPU's vector width (8 floats for AVX2, 16 for AVX-512). Such a file still
loads on other x86-64 CPUs, but is tuned for, and only verified on, the kind of machine that produced it; the
sidecar says so. Level "extended" gives a portable file.
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.backends import Engine, EngineOptions, Runner, validate_input, write_sidecar
from sedeploy.errors import SedeployError
from sedeploy.machine import cpu_description
from sedeploy.fsutil import atomic_path, ensure_writable_dir
from sedeploy.onnxcore import as_model, graph_precision, sha256_file
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


def optimized_graph_histogram(path: str | Path, level: str = "all", threads: int = 1) -> dict[str, int]:
    """Op histogram of the graph ORT actually runs at ``level`` on the CPU (its optimized model, saved to a
    temporary file). This is where the NCHWc ``ReorderInput`` / ``ReorderOutput`` conversions around SE blocks
    become visible: ORT keeps the SE squeeze (ReduceMean) and scale (Mul) in plain NCHW."""
    with tempfile.TemporaryDirectory(prefix="sedeploy-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(path, providers=[CPU], threads=threads, optimization=level, optimized_model_path=out,
                     quiet=True)
        return op_histogram(out)


def build_engine(onnx_path: str | Path, out_dir: str | Path, options: EngineOptions | None = None) -> Engine:
    """The backend-table entry point: :func:`build_ort_engine` with the options that concern ONNX Runtime."""
    options = options or EngineOptions()
    return build_ort_engine(onnx_path, out_dir, threads=options.threads)


def build_ort_engine(onnx_path: str | Path, out_dir: str | Path, *, threads: int | None = None,
                     providers: str | Sequence[str] | None = None, optimization: str = "all") -> Engine:
    """Save ORT's optimized graph of ``onnx_path`` as ``<stem>.ort-opt.onnx`` plus ``<stem>.ort.json``.

    ORT writes the optimized model itself (``SessionOptions.optimized_model_filepath``), so it is pointed at a
    temporary name in ``out_dir`` that is renamed into place only once the session was created and the file read
    back. At levels "all" / "layout" the result is specific to this CPU's vector width (see the module docstring).
    """
    from sedeploy import __version__

    ort = ort_module()
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
        "backend": "ort", "sedeploy_version": __version__, "onnxruntime_version": ort.__version__,
        "providers": active, "optimization": str(optimization).lower(), "intra_op_threads": threads_used,
        "precision": precision, "source_model": str(src), "source_sha256": sha256_file(src),
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
    return Engine(path=final, sidecar=sidecar, backend="ort", precision=precision, source=src, metadata=metadata)
