"""OpenVINO backend (CPU): the same ONNX artifacts as the other backends, saved as OpenVINO IR and run by OpenVINO.

``openvino`` is imported only inside functions: this module imports, and its pure parts are tested, anywhere.
Importing it, its version, the compile properties and the checks of a saved engine's files are in
:mod:`sedeploy.backends.openvino_support`. Without the package every entry point raises
:class:`~sedeploy.errors.MissingDependencyError` (exit 4) with the install hint ``pip install
'sedeploy[openvino]'``.

Build (:func:`build_engine`): ``Core().read_model(artifact.onnx)`` → ``save_model`` as ``<stem>.ov.xml`` +
``<stem>.ov.bin`` (both published, or neither), with the weights kept as they are in the graph
(``compress_to_fp16=False``: ``save_model`` would otherwise store FP32 weights as FP16 by default), then a JSON
sidecar ``<stem>.ov.json`` (OpenVINO version, precision read from the graph, source sha256, CPU, threads, the
inference-precision and performance hints). OpenVINO reads sedeploy's Q/DQ INT8 artifacts and turns them into
int8 kernels with its low-precision transformations: ``.int8-ov.onnx`` (signed where negative, uint8 after ReLU;
the form built by default, see :mod:`sedeploy.quantize`) and ``.int8-trt.onnx`` (signed activations: slower and less faithful here). It
does not read the ONNX Runtime QOperator form (``.int8-cpu.onnx``): that is refused with the ops it cannot convert.
An FP32 artifact is read after one exact rewrite, :func:`sedeploy.passes.squeeze_first` (each bottleneck SE
squeeze pools the expanding conv's input, a quarter of the channels; measured faster, see that module); the
sidecar lists it under ``graph_rewrites`` and the build's parity check compares the engine with ONNX Runtime on the
artifact as written, so the rewrite is verified on every build. INT8 artifacts are read as they are.

Run (:class:`OpenVinoRunner`): compiled for the CPU with the threads pinned like ONNX Runtime's
(``INFERENCE_NUM_THREADS``, default all cores this process may use) and one synchronous infer request.

- Precision: ``INFERENCE_PRECISION_HINT`` is always set explicitly, from the graph's precision (FP32 and INT8
  graphs: ``f32`` for everything that is not quantized; FP16 graphs: ``f16``). On CPUs with AMX / AVX512-BF16
  OpenVINO's default for an FP32 model is bf16 — a silent precision change sedeploy does not make. After
  compiling, the hint is read back; a CPU that cannot honour it is an error, not a fallback.
- ``PERFORMANCE_HINT``: :data:`DEFAULT_PERFORMANCE_HINT` (LATENCY: one stream using all the threads). Measured
  against THROUGHPUT with the one synchronous request sedeploy's runners make (THROUGHPUT splits the threads into
  several streams and a single request gets one of them): SE-ResNet-50, 2 threads, interleaved, × ORT FP32 at
  batch 1 / 8 — FP32 engine 1.05 / 1.08 with LATENCY vs 0.55 / 0.57 with THROUGHPUT; INT8 (int8-trt artifact)
  3.86 / 4.40 vs 2.19 / 2.25. THROUGHPUT pays off only with several requests in flight (a server's job).
- Static batch (``static_batch=True``, the default): a model with a dynamic input dimension is compiled once
  more for each input shape it is called with (the model reshaped to that shape, at most
  :data:`MAX_STATIC_SHAPES` kept; the first call of a new size pays the compile). OpenVINO's CPU plugin runs a
  static shape faster than the same graph with a dynamic batch: measured interleaved, SE-ResNet-50 INT8
  (``int8-ov``), 2 threads: ×1.06 at batch 1 and ×1.05 at batch 8; an NNCF-quantized model gains ×1.06 / ×1.08
  (benchmarks/results/ov_static_batch/). Every OpenVINO runner — the peers of ``bench --peers`` included — uses it.
- Version: the sidecar's OpenVINO release (major.minor, compared as numbers) must be the installed one; an IR
  saved by another release is refused before anything is compiled.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy import __version__, layout
from sedeploy.artifacts import Artifact
from sedeploy.backends import BackendCompileError, Engine, EngineOptions, Runner, read_sidecar, sidecar_path, \
    validate_input, write_sidecar
from sedeploy.backends.openvino_support import DEFAULT_PERFORMANCE_HINT, DEVICE, PRECISION_HINTS, check_files, \
    check_version, compile_config, first_error_line, layer_times, precision_hint_for, require_openvino
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.fsutil import disk_full_error, ensure_writable_dir, short_of_space
from sedeploy.machine import cpu_description
from sedeploy.onnxcore import default_threads, image_input, load_onnx, run_model, save_onnx, sha256_file
from sedeploy.passes import squeeze_first
from sedeploy.preprocess import layout_batch, smooth_noise

__all__ = ["OpenVinoRunner", "OpenVinoModelRunner", "build_engine", "parity_check", "unsupported_here"]

ENGINE_SUFFIX = layout.ENGINE_SUFFIX["openvino"]
WEIGHTS_SUFFIX = layout.OPENVINO_WEIGHTS_SUFFIX
#: graph precision → the CPU plugin's OPTIMIZATION_CAPABILITIES entry it needs (fp32 and int8 run on any x86-64)
NEEDED_CAPABILITY = {"fp16": "FP16"}
#: FP32 parity with ONNX Runtime checked at build time: max |Δlogit| ≤ this × max |logit|
FP32_PARITY_RTOL = 1e-4
#: batch sizes compiled as static shapes per runner (each compiled model holds its own buffers)
MAX_STATIC_SHAPES = 4


def unsupported_here(precision: str) -> str | None:
    """Why this machine's CPU cannot run a graph of ``precision`` in that precision under OpenVINO (None when it
    can): an FP16 graph needs FP16 arithmetic (AVX512-FP16 / AMX-FP16), which many x86 CPUs lack — OpenVINO would
    then run it in f32 or bf16, a precision change sedeploy does not make silently."""
    need = NEEDED_CAPABILITY.get(precision)
    if need is None:
        return None
    ov = require_openvino("Checking the CPU's OpenVINO precisions")
    caps = list(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    if need in caps:
        return None
    return (f"this CPU has no {precision.upper()} arithmetic for OpenVINO (its capabilities: {', '.join(caps)}), "
            f"and sedeploy does not run an {precision.upper()} graph in another precision silently")



class OpenVinoModelRunner(Runner):
    """Runs a model OpenVINO reads (an ``ov.Model`` in memory, an IR ``.xml`` or an ``.onnx`` file) on the CPU
    with explicit threads and precision. :class:`OpenVinoRunner` adds the sidecar checks for sedeploy engines;
    this class alone serves the peers of a benchmark (OpenVINO reading the FP32 ONNX, an NNCF-quantized model)."""

    backend = "openvino"
    timer_coverage = ("OpenVINO InferRequest.infer (one synchronous request): host numpy batch in → host numpy "
                      "logits out (copied)")

    def __init__(self, source, *, precision: str, label: str | None = None, threads: int | None = None,
                 performance_hint: str = DEFAULT_PERFORMANCE_HINT, perf_counters: bool = False,
                 static_batch: bool = True):
        self.ov = require_openvino("Running OpenVINO models")
        is_path = isinstance(source, (str, os.PathLike))
        super().__init__(source if is_path else None)
        if is_path and not self.path.is_file():
            raise SedeployError(f"The OpenVINO model '{self.path}' does not exist.", fix="check the path")
        self.source = source
        self.label = label
        self.precision = precision
        self.precision_hint = precision_hint_for(precision)
        self.threads = default_threads() if threads is None else threads
        self.performance_hint = performance_hint
        self.config = compile_config(threads=self.threads, precision_hint=self.precision_hint,
                                     performance_hint=performance_hint, perf_counters=perf_counters)
        self.static_batch = static_batch
        self.compiled = self.request = self.model = None
        self._last_request = None
        self._core = None
        self._static: dict[tuple, Any] = {}  # input shape → infer request of the model compiled at that shape

    @property
    def name(self) -> str:
        return self.label or super().name

    def _activate(self) -> None:
        core = self.ov.Core()
        try:
            self.model = core.read_model(str(self.source)) if self.path is not None else self.source
            self.compiled = core.compile_model(self.model, DEVICE, self.config)
        except RuntimeError as err:
            raise BackendCompileError(f"OpenVINO {self.ov.get_version()} cannot compile '{self.name}' for the CPU: "
                                      f"{first_error_line(err)}", backend="openvino", model=self.name,
                                      reason=first_error_line(err),
                                      fix="rebuild the engine with `sedeploy build-engine --backend openvino`") from err
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        got = got.get_type_name() if hasattr(got, "get_type_name") else str(got).lower()
        if got != self.precision_hint:
            self.compiled = None
            raise SedeployError(f"OpenVINO compiled '{self.name}' with inference precision {got}, not the "
                                f"{self.precision_hint} its {self.precision.upper()} graph asks for (this CPU "
                                f"offers {', '.join(core.get_property(DEVICE, 'OPTIMIZATION_CAPABILITIES'))}).",
                                fix="run this engine on a CPU that supports its precision, or use the FP32 "
                                    "artifact (sedeploy does not change precision silently)")
        inputs = self.compiled.inputs
        if len(inputs) != 1:
            raise SedeployError(f"'{self.name}' has {len(inputs)} inputs.", expected="one image-batch input")
        inp = inputs[0]
        self.input_name = inp.get_any_name()
        self.input_shape = [d.get_length() if d.is_static else None for d in inp.get_partial_shape()]
        self.input_dtype = np.dtype(inp.get_element_type().to_dtype())
        self.request = self._last_request = self.compiled.create_infer_request()
        self._core, self._static = core, {}

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """Input shapes compiled as static models so far (oldest first; empty when the model's shape is static or
        ``static_batch`` is off)."""
        return list(self._static)

    def _request_for(self, shape: tuple[int, ...]):
        """The request that runs an input of ``shape``: the model's own when its input shape is static (or
        ``static_batch`` is off), else one of the model compiled at exactly that shape (compiled on first use; the
        oldest of :data:`MAX_STATIC_SHAPES` goes)."""
        if not self.static_batch or None not in self.input_shape:
            return self.request
        if shape not in self._static:
            if len(self._static) >= MAX_STATIC_SHAPES:
                del self._static[next(iter(self._static))]
            model = self.model.clone()
            try:
                model.reshape({model.inputs[0]: list(shape)})
                self._static[shape] = self._core.compile_model(model, DEVICE, self.config).create_infer_request()
            except RuntimeError as err:
                raise BackendCompileError(f"OpenVINO {self.ov.get_version()} cannot compile '{self.name}' for the "
                                          f"input shape {list(shape)} (batch {shape[0]}): {first_error_line(err)}",
                                          backend="openvino", model=self.name, reason=first_error_line(err),
                                          fix=f"a batch that large may not fit in memory: try a smaller batch (bench "
                                              f"--batch); from Python, OpenVinoRunner(..., static_batch=False) "
                                              f"runs the dynamic-batch model instead") from err
        return self._static[shape]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        x = validate_input(x, name=self.input_name, dtype=self.input_dtype, shape=self.input_shape,
                           engine=f"OpenVINO ({self.name})")
        request = self._last_request = self._request_for(tuple(x.shape))
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data, copy=True)

    def _deactivate(self) -> None:
        self.request = self.compiled = self.model = self._last_request = self._core = None
        self._static = {}

    def layer_times(self) -> list[dict[str, Any]]:
        """Per-layer times of the last inference (needs ``perf_counters=True``); see :func:`layer_times`."""
        if self.request is None:
            raise SedeployError(f"The OpenVINO runner for '{self.name}' is not active.",
                                fix="call activate() and infer() first")
        if not self.config["PERF_COUNT"]:
            raise SedeployError(f"'{self.name}' was compiled without performance counters.",
                                fix="construct the runner with perf_counters=True")
        return layer_times(self._last_request)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"openvino_version": self.ov.get_version(), "device": DEVICE, "threads": self.threads,
                  "inference_precision_hint": self.precision_hint, "performance_hint": self.performance_hint,
                  "infer_requests": 1,
                  "static_batch": ("compiled per batch size" if self.static_batch else "as the model declares it")})
        if self.path is None:
            d["source"] = "in-memory ov.Model"
        return d


class OpenVinoRunner(OpenVinoModelRunner):
    """Runs a sedeploy OpenVINO engine (``<stem>.ov.xml`` + ``.ov.bin`` + ``.ov.json``); ``infer(x)`` returns the
    logits. The sidecar is checked on construction: an engine saved by another OpenVINO release is refused."""

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 performance_hint: str = DEFAULT_PERFORMANCE_HINT, perf_counters: bool = False,
                 static_batch: bool = True):
        path = Path(path)
        if not path.name.endswith(ENGINE_SUFFIX):
            raise SedeployError(f"'{path}' is not an OpenVINO engine file.",
                                expected=f"a file ending in {ENGINE_SUFFIX} written by `sedeploy build-engine "
                                         "--backend openvino`")
        if not path.is_file():
            raise SedeployError(f"The OpenVINO engine '{path}' does not exist.", fix="check the path")
        weights = path.with_name(path.name[: -len(ENGINE_SUFFIX)] + WEIGHTS_SUFFIX)
        if not weights.is_file():
            raise SedeployError(f"The weights file '{weights}' of the OpenVINO engine '{path}' is missing.",
                                fix="rebuild the engine with `sedeploy build-engine --backend openvino`")
        self.sidecar = read_sidecar(sidecar_path(path), engine=path)
        ov = require_openvino("Running OpenVINO engines (--backend openvino)")
        check_version(self.sidecar, ov.get_version(), engine=path)
        check_files(self.sidecar, path, weights)
        precision = str(self.sidecar.get("precision", ""))
        if precision not in PRECISION_HINTS:
            raise SedeployError(f"The sidecar of '{path}' records precision {precision!r}.",
                                expected="fp32, fp16 or int8",
                                fix="rebuild the engine with `sedeploy build-engine --backend openvino`")
        super().__init__(path, precision=precision, threads=threads, performance_hint=performance_hint,
                         perf_counters=perf_counters, static_batch=static_batch)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"precision": self.precision, "built_with_openvino": self.sidecar.get("openvino_version"),
                  "source_model": self.sidecar.get("source_model")})
        return d

def _op_histogram(model) -> dict[str, int]:
    return dict(Counter(op.get_type_name() for op in model.get_ordered_ops()).most_common())


def _profile(model) -> dict[str, list[int]]:
    """The input's shape as the other backends' sidecars record a batch profile (−1: dynamic)."""
    shape = [d.get_length() if d.is_static else -1 for d in model.inputs[0].get_partial_shape()]
    if len(shape) != 4:
        raise SedeployError(f"The model's input has shape {shape}.", expected="N×C×H×W (rank 4)")
    return {"min": [shape[0] if shape[0] > 0 else 1, *shape[1:]], "max": shape}


def parity_check(src: Path, xml: Path, precision: str, threads: int) -> dict[str, Any]:
    """Compile the saved IR as the runner will and compare with ONNX Runtime on the same artifact (smooth test
    images). FP32 must match to :data:`FP32_PARITY_RTOL` relative; other precisions must give finite logits of
    the same shape (their agreement is measured on real images by `sedeploy bench`)."""

    inp = image_input(load_onnx(src, weights=False, check=False), path=str(src))
    n = inp.static_batch or 2
    x = layout_batch(smooth_noise(n, (inp.height, inp.width), seed=3), inp.layout).astype(np.float32)
    runner = OpenVinoModelRunner(xml, precision=precision, threads=threads)
    with runner:
        got = runner.infer(x)
    ref = run_model(src, x)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        raise VerificationError(f"OpenVINO's model of '{src}' returns {got.shape} "
                                f"{'non-finite ' if not np.all(np.isfinite(got)) else ''}logits; ONNX Runtime "
                                f"returns {ref.shape}. Nothing was written.", fix="report this as a bug")
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    scale = float(np.abs(ref).max())
    check = {"images": n, "max_abs_diff_vs_ort": diff, "max_abs_logit": scale}
    if precision == "fp32":
        tol = FP32_PARITY_RTOL * max(1.0, scale)
        check["tolerance"] = tol
        if not diff <= tol:
            raise VerificationError(f"OpenVINO's FP32 model of '{src}' differs from ONNX Runtime by max |Δlogit| "
                                    f"{diff:.3g} > {tol:.3g} ({FP32_PARITY_RTOL:g} × max |logit|); nothing was "
                                    "written.", fix="report this as a bug with the model")
    return check


def build_engine(artifact_path: str | Path, out_dir: str | Path, options: EngineOptions | None = None, *,
                 source_as: str | Path | None = None) -> Engine:
    """Save ``artifact_path`` (an ONNX artifact) as the OpenVINO engine ``<stem>.ov.xml`` / ``.ov.bin`` plus the
    sidecar ``<stem>.ov.json`` in ``out_dir``; both model files are published together or not at all.
    ``source_as``: the path the sidecar records as the engine's source (where the artifact is published, when it is
    built in a staging folder; default: the artifact's path)."""

    options = options or EngineOptions()
    ov = require_openvino("Building OpenVINO engines (--backend openvino)")
    src = Path(artifact_path)
    if not src.is_file():
        raise SedeployError(f"The ONNX file '{src}' does not exist.", fix="check the path")
    art = Artifact.from_file(src)
    why = unsupported_here(art.precision)
    if why is not None:
        raise SedeployError(f"No OpenVINO engine can be built from '{src}' on this machine: {why}.",
                            expected="an artifact whose precision this CPU runs (fp32, int8-ov)",
                            fix="build the OpenVINO engine from the .fp32.onnx or .int8-ov.onnx artifact; the "
                                ".fp16.onnx artifact is for TensorRT (or for a CPU with FP16 arithmetic)")
    out = ensure_writable_dir(out_dir)
    stem = src.name.removesuffix(".onnx")
    final_xml, final_bin = out / f"{stem}{ENGINE_SUFFIX}", out / f"{stem}{WEIGHTS_SUFFIX}"
    sidecar = out / f"{stem}{layout.SIDECAR_SUFFIX['openvino']}"
    threads = default_threads() if options.threads is None else options.threads
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{stem}.ov-"))
    try:
        return _build(ov, src, art, tmp, final_xml, final_bin, sidecar, threads, t0, Path(source_as or src))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_rewrites(src: Path, art, tmp: Path) -> tuple[Path, dict[str, int]]:
    """The ONNX file OpenVINO reads, and the exact graph rewrites applied to it for this engine: an FP32
    artifact gets :func:`sedeploy.passes.squeeze_first` (measured faster on OpenVINO, see that module); other
    precisions are read as they are."""
    if art.precision != "fp32":
        return src, {}

    rewritten, report = squeeze_first(load_onnx(src))
    if not report.rewritten:
        return src, {}
    return save_onnx(rewritten, tmp / src.name), {"squeeze_first": report.rewritten}


def _build(ov, src: Path, art, tmp: Path, final_xml: Path, final_bin: Path, sidecar: Path, threads: int,
           t0: float, recorded: Path) -> Engine:
    """build_engine's work once the inputs are checked: read (after the CPU rewrites), save the IR in ``tmp``,
    check parity against ONNX Runtime on the artifact itself, publish; the sidecar names ``recorded`` as the
    source."""

    stem = src.name.removesuffix(".onnx")
    read_from, rewrites = _cpu_rewrites(src, art, tmp)
    try:
        model = ov.Core().read_model(str(read_from))
    except RuntimeError as err:
        failed = sorted({op.strip() for line in str(err).splitlines() if line.startswith("-- ") and ":" in line
                         for op in line.split(":", 1)[1].split(",") if op.strip()})
        why = f"ops it cannot convert: {', '.join(failed)}" if failed else first_error_line(err)
        hint = (" (the INT8 CPU form is ONNX Runtime's QOperator format, QLinearConv & co.)"
                if art.kind == "int8-cpu" else "")
        raise BackendCompileError(f"OpenVINO {ov.get_version()} cannot read '{src}'{hint}: {why}.",
                                  backend="openvino", model=src, reason=why,
                                  expected="an ONNX artifact OpenVINO's ONNX frontend imports (fp32, fp16, int8-ov, "
                                           "int8-trt)",
                                  fix="build the OpenVINO engine from the .int8-ov.onnx artifact (written by "
                                      "`sedeploy build-engine --int8 --backend openvino`), or from .fp32.onnx") from err
    profile = _profile(model)
    histogram = _op_histogram(model)
    published: list[Path] = []
    try:
        tmp_xml = tmp / f"{stem}{ENGINE_SUFFIX}"
        try:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        except RuntimeError as err:  # OpenVINO reports a failed write as "basic_ios::clear: iostream error"
            if short_of_space(tmp, src.stat().st_size):
                raise disk_full_error(final_xml, err) from err
            raise SedeployError(f"OpenVINO {ov.get_version()} could not save the IR of '{src}': {first_error_line(err)}.",
                                fix="check that the output folder is writable, then rebuild") from err
        tmp_bin = tmp / f"{stem}{WEIGHTS_SUFFIX}"
        if not tmp_xml.is_file() or not tmp_bin.is_file():
            raise SedeployError(f"OpenVINO {ov.get_version()} did not write the IR of '{src}' (.xml and .bin).")
        check = parity_check(src, tmp_xml, art.precision, threads)
        metadata = {
            "backend": "openvino", "sedeploy_version": __version__, "openvino_version": ov.get_version(),
            "device": DEVICE, "precision": art.precision, "kind": art.kind, "flavour": art.flavour,
            "source_model": str(recorded.resolve()), "source_sha256": sha256_file(src),
            "engine_sha256": sha256_file(tmp_xml), "weights_sha256": sha256_file(tmp_bin),
            "weights_file": final_bin.name, "compress_to_fp16": False,
            "threads": threads, "inference_precision_hint": precision_hint_for(art.precision),
            "performance_hint": DEFAULT_PERFORMANCE_HINT, "profile": profile, "op_histogram": histogram,
            "graph_rewrites": rewrites,
            "build_check": check, **cpu_description(),
            "note": "OpenVINO IR: portable across CPUs; kernels are chosen when the runner compiles it",
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        tmp_sidecar = tmp / sidecar.name
        write_sidecar(tmp_sidecar, metadata)  # everything is written before anything in out_dir is replaced
        for done, final in ((tmp_bin, final_bin), (tmp_xml, final_xml), (tmp_sidecar, sidecar)):
            os.replace(done, final)
            published.append(final)
    except BaseException:
        # an engine without its weights or sidecar is not published; once a previous engine's files are replaced,
        # its sidecar describes files that are gone, so it goes too
        for f in published + ([sidecar] if published else []):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        raise
    return Engine(path=final_xml, sidecar=sidecar, backend="openvino", precision=art.precision,
                  source=recorded,
                  metadata=metadata, companions=[final_bin])
