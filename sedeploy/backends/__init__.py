"""Engine backends: a *builder* turns a portable ONNX artifact into an engine, a *runner* executes one.

The backends, in one table (:data:`BACKENDS`):

- ``ort`` — ONNX Runtime (:mod:`sedeploy.backends.ort`), the embedded default; runs on any CPU (and on CUDA with
  onnxruntime-gpu). Its "engine" is ORT's own optimized graph.
- ``trt`` — TensorRT 10.x/11.x (:mod:`sedeploy.backends.tensorrt`), NVIDIA GPUs; a serialized plan.
- ``openvino`` — OpenVINO (:mod:`sedeploy.backends.openvino`), Intel/AMD CPUs; a compiled model.

Each backend module provides ``build_engine(artifact_path, out_dir, options) -> Engine`` and a runner class; this
module dispatches to them (:func:`build_engine`, :func:`open_runner`) so no other module switches on backend
names. Heavy libraries are imported inside the backend's functions only.

Every engine file is published together with a JSON *sidecar* (``<stem>.<backend>.json``) that records what it
was built from and with what (library version, device, precision, source sha256). The sidecar is a separate file
on purpose: the engine file stays byte-for-byte what the library produced and can be loaded by other tools, and
the runner can refuse an engine built for another library version before touching a device.

Runners follow one protocol (:class:`Runner`, after Polygraphy's runners): construct (cheap: checks only),
``activate()`` (load the engine, allocate), ``infer(x) -> logits`` (as often as needed), ``deactivate()``
(free everything); ``with runner:`` does activate/deactivate. ``describe()`` says what runs and how.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.fsutil import atomic_write_text
from sedeploy.layout import ENGINE_SUFFIX, SIDECAR_SUFFIX

__all__ = ["BACKENDS", "BUILD_CHOICES", "Backend", "BackendCompileError", "Engine", "EngineOptions", "Runner",
           "backend", "build_engine", "backend_for_engine", "default_cpu_backend", "fallback_backend",
           "resolve_backend", "open_runner", "sidecar_path", "read_sidecar", "write_sidecar", "validate_input"]


@dataclass(frozen=True)
class Backend:
    """One row of the backend table."""

    name: str  # the CLI's --backend value
    label: str  # what people call it
    module: str  # the module with build_engine() and the runner
    runner: str  # the runner class in that module
    kinds: tuple[str, ...]  # artifact kinds it builds engines from (the other INT8 flavour is not meant for it)
    engine_suffixes: tuple[str, ...]  # file endings of its engines
    extra: str | None  # pip extra that installs it (None: a core dependency)
    import_name: str  # the Python package it needs
    device: str  # "cpu" | "gpu" | "cpu/gpu"
    sidecar_suffix: str  # <stem><suffix> is the JSON sidecar of <stem><engine suffix>
    runner_options: tuple[str, ...] = ()  # keyword options its runner takes (threads, providers, …)
    issues: str = ""  # where its library's own failures are reported
    fallback: str | None = None  # `--backend auto`: the CPU backend that builds what this one cannot compile


#: The backends sedeploy builds for, in the order the CLI lists them.
BACKENDS: dict[str, Backend] = {
    "ort": Backend("ort", "ONNX Runtime", "sedeploy.backends.ort", "OrtRunner", ("fp32", "fp16", "int8-cpu"),
                   (ENGINE_SUFFIX["ort"],), None, "onnxruntime", "cpu/gpu", SIDECAR_SUFFIX["ort"],
                   ("threads", "providers", "optimization"), "https://github.com/microsoft/onnxruntime/issues"),
    "trt": Backend("trt", "TensorRT", "sedeploy.backends.tensorrt", "TrtRunner", ("fp32", "fp16", "int8-trt"),
                   (ENGINE_SUFFIX["trt"],), "tensorrt", "tensorrt", "gpu", SIDECAR_SUFFIX["trt"], (),
                   "https://github.com/NVIDIA/TensorRT/issues"),
    "openvino": Backend("openvino", "OpenVINO", "sedeploy.backends.openvino", "OpenVinoRunner",
                        ("fp32", "fp16", "int8-ov"), (ENGINE_SUFFIX["openvino"],), "openvino", "openvino",
                        "cpu", SIDECAR_SUFFIX["openvino"], ("threads",),
                        "https://github.com/openvinotoolkit/openvino/issues", "ort"),
}

class BackendCompileError(SedeployError):
    """A backend's library refused to read or compile a model (its own error, not sedeploy's checks). The
    ``build-engine --backend auto`` pipeline builds that precision on the row's :attr:`Backend.fallback` instead;
    everywhere else it is an ordinary :class:`~sedeploy.errors.SedeployError` (exit 2)."""

    def __init__(self, what: str, *, backend: str, model: str | Path, reason: str, expected: str | None = None,
                 fix: str | None = None):
        super().__init__(what, expected=expected, fix=fix)
        self.backend, self.model, self.reason = backend, str(model), reason


def fallback_backend(name: str) -> str | None:
    """The CPU backend ``--backend auto`` builds on when backend ``name`` cannot compile an artifact (None: none)."""
    return backend(name).fallback


#: what ``build-engine --backend`` accepts: a backend, ``auto`` (:func:`default_cpu_backend`) or ``none`` (artifacts only)
BUILD_CHOICES: tuple[str, ...] = ("auto", *BACKENDS, "none")


@dataclass
class EngineOptions:
    """What a build may be asked, for any backend (each backend reads the fields that concern it)."""

    threads: int | None = None  # CPU backends: intra-op threads (None: all cores this process may use)
    min_batch: int = 1  # TensorRT optimization profile
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gib: float = 4.0  # TensorRT builder workspace
    timing_cache: str | Path | None = None  # TensorRT timing cache file


@dataclass
class Engine:
    """What a builder produced: the engine file, its sidecar, and the sidecar's content."""

    path: Path
    sidecar: Path
    backend: str  # a key of BACKENDS
    precision: str  # "fp32" | "fp16" | "int8", as read from the graph
    source: Path | None = None  # the artifact it was built from
    metadata: dict[str, Any] = field(default_factory=dict)
    companions: list[Path] = field(default_factory=list)  # other files the engine needs (OpenVINO's .bin weights)

    @property
    def files(self) -> list[Path]:
        """Every file of this engine: the engine, its companions and its sidecar."""
        return [self.path, *self.companions, self.sidecar]

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sidecar": str(self.sidecar), "backend": self.backend,
                "precision": self.precision, "source": str(self.source) if self.source else None,
                "files": [str(f) for f in self.files]}


class Runner:
    """The runner protocol (base class). Subclasses implement ``_activate``, ``_infer`` and ``_deactivate`` and set
    ``input_name``, ``input_shape`` (ints for static dimensions, None for dynamic ones) and ``input_dtype`` in
    ``_activate``."""

    backend: str = ""
    #: what the bench timer covers for this runner (said in every results file)
    timer_coverage: str = "one engine call: host numpy batch in → host numpy logits out"
    input_name: str = ""
    input_shape: list = []
    input_dtype: np.dtype = np.dtype(np.float32)

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._active = False

    @property
    def name(self) -> str:
        return self.path.name if self.path else type(self).__name__

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> "Runner":
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._deactivate()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits of one batch (the first output), as a host numpy array."""
        if not self._active:
            raise SedeployError(f"The {self.backend or type(self).__name__} runner for '{self.name}' is not active.",
                                fix="use it inside `with runner:` (or call runner.activate() first)")
        return self._infer(x)

    def runs_on(self) -> str:
        """Where the engine computes: "cpu" or "cuda" (asked after ``activate()``)."""
        return "cpu"

    def precision_note(self) -> str | None:
        """What a reader of this runner's results must know about the precision it really computes in, when that
        is not the graph's (None: it computes as the graph says). Asked after ``activate()``."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": str(self.path) if self.path else None, "input": self.input_name,
                "input_shape": list(self.input_shape), "input_dtype": np.dtype(self.input_dtype).name}

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # subclasses
    def _activate(self) -> None:
        pass

    def _infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass


def default_cpu_backend() -> str:
    """The rule for ``--backend auto`` (the default): OpenVINO when it imports and the CPU is x86-64, else ONNX
    Runtime (an installed ``openvino`` that fails to import is named in a warning, not used). Measured interleaved in one run (benchmarks/results/openvino_peers/, SE-ResNet-50/101, batch 1 and 8,
    an x86-64 CPU with AVX-512 VNNI and AMX): on a quiet machine OpenVINO FP32 1.00–1.08× ONNX Runtime FP32 and
    OpenVINO on sedeploy's ``int8-ov`` artifact 2.2–2.5× ONNX Runtime's ``int8-cpu`` (under load: 1.29–1.47× and
    1.9–2.8×). ARM CPUs were not measured, so they stay on ONNX Runtime."""
    import importlib.util
    import logging
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or importlib.util.find_spec("openvino") is None:
        return "ort"
    try:
        importlib.import_module("openvino")
    except Exception as err:  # a broken install raises anything on import; named below, not hidden
        logging.getLogger("sedeploy").warning(
            "--backend auto: the installed openvino package does not import (%s), so ONNX Runtime engines are built; "
            "reinstall it (pip install --force-reinstall 'sedeploy[openvino]') or pass --backend ort", err)
        return "ort"
    return "openvino"


def resolve_backend(name: str) -> str:
    """``"auto"`` → :func:`default_cpu_backend`; any other name is returned as given (checked by the caller)."""
    return default_cpu_backend() if name == "auto" else name


def backend(name: str) -> Backend:
    """The table row for ``name``, or a clear error listing the backends."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise SedeployError(f"Unknown backend {name!r}.", expected=f"one of {', '.join(BACKENDS)}",
                            fix="pass --backend ort (ONNX Runtime, runs everywhere), trt (NVIDIA GPU) or openvino "
                                "(CPU)") from None


def require(name: str, purpose: str):
    """Import backend ``name``'s module after checking its library is importable (exit 4 with the install hint)."""
    b = backend(name)
    if importlib.util.find_spec(b.import_name) is None:
        raise MissingDependencyError(b.import_name, b.extra or "", purpose)
    if importlib.util.find_spec(b.module) is None:
        raise SedeployError(f"This sedeploy installation has no {b.label} backend module ({b.module}).",
                            fix="reinstall sedeploy from a complete checkout")
    return importlib.import_module(b.module)


def build_engine(name: str, artifact: str | Path, out_dir: str | Path, options: EngineOptions | None = None, *,
                 source_as: str | Path | None = None) -> Engine:
    """Build backend ``name``'s engine from one ONNX artifact into ``out_dir``; ``source_as``: the path its sidecar
    records as its source (where the artifact is published; default: ``artifact``)."""
    module = importlib.import_module(backend(name).module)
    return module.build_engine(artifact, out_dir, options or EngineOptions(), source_as=source_as)


def unsupported_here(name: str, precision: str) -> str | None:
    """Why backend ``name`` cannot run ``precision`` on this machine (None when it can, or when the backend does
    not say): asked before building, so a precision the hardware lacks is skipped or refused, never changed."""
    module = importlib.import_module(backend(name).module)
    check = getattr(module, "unsupported_here", None)
    return None if check is None else check(precision)


def backend_for_engine(path: str | Path) -> Backend:
    """Which backend runs an engine file, from its name (``.ort-opt.onnx``, ``.plan``, ``.ov.xml``); a plain
    ``.onnx`` artifact runs on ONNX Runtime."""
    name = Path(path).name
    for b in BACKENDS.values():
        if any(name.endswith(s) for s in b.engine_suffixes):
            return b
    if name.endswith(".onnx"):
        return BACKENDS["ort"]
    endings = ", ".join(s for b in BACKENDS.values() for s in b.engine_suffixes)
    raise SedeployError(f"'{path}' is not an engine file sedeploy knows.",
                        expected=f"an .onnx artifact or an engine ending in {endings}",
                        fix="pass a file written by `sedeploy build-engine`")


def sidecar_path(engine: str | Path) -> Path:
    """The JSON sidecar that belongs to an engine file (``x.fp32.plan`` → ``x.fp32.trt.json``)."""
    engine = Path(engine)
    b = backend_for_engine(engine)
    name = engine.name
    for suffix in (*b.engine_suffixes, ".onnx"):
        if name.endswith(suffix):
            return engine.with_name(name[: -len(suffix)] + b.sidecar_suffix)
    return engine.with_name(name + b.sidecar_suffix)


def open_runner(path: str | Path, **options) -> Runner:
    """An (inactive) runner for an engine file. ``options`` (threads, providers, optimization) go to the backend's
    runner when it takes them (see :attr:`Backend.runner_options`); ``None`` values mean "the default"."""
    b = backend_for_engine(path)
    module = importlib.import_module(b.module)
    kwargs = {k: v for k, v in options.items() if k in b.runner_options and v is not None}
    return getattr(module, b.runner)(path, **kwargs)


def write_sidecar(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a sidecar atomically (sorted keys, so two builds can be diffed)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_sidecar(path: str | Path, *, engine: str | Path | None = None) -> dict[str, Any]:
    """Read a sidecar, with errors that say which engine it belongs to and how to recreate it."""
    path = Path(path)
    about = f" for the engine '{engine}'" if engine else ""
    if not path.is_file():
        raise SedeployError(f"The sidecar file '{path}'{about} is missing.",
                            expected="the JSON file sedeploy writes next to every engine it builds",
                            fix="rebuild the engine with sedeploy (the sidecar records how it was built)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SedeployError(f"The sidecar file '{path}'{about} is not valid JSON ({err}).",
                            fix="rebuild the engine with sedeploy") from err
    if not isinstance(data, dict):
        raise SedeployError(f"The sidecar file '{path}'{about} holds a {type(data).__name__}, not an object.",
                            fix="rebuild the engine with sedeploy")
    return data


def validate_input(x, *, name: str, dtype: np.dtype, shape: list, engine: str) -> np.ndarray:
    """Check a batch against a runner's input signature; return it C-contiguous.

    ``shape`` holds ints for static dimensions and anything else (None, -1, a symbol) for dynamic ones. There is
    no silent dtype conversion: a float64 array fed to a float32 engine is a mistake worth hearing about.
    """
    if not isinstance(x, np.ndarray):
        raise SedeployError(f"{engine}: input '{name}' must be a numpy array, got {type(x).__name__}.",
                            fix="pass np.asarray(batch, dtype=np.float32)")
    if x.dtype != dtype:
        raise SedeployError(f"{engine}: input '{name}' has dtype {x.dtype}, the engine takes {np.dtype(dtype)}.",
                            fix=f"convert first: x.astype(np.{np.dtype(dtype).name})")
    if x.ndim != len(shape):
        raise SedeployError(f"{engine}: input '{name}' has shape {tuple(x.shape)}, the engine takes rank "
                            f"{len(shape)} {_fmt_shape(shape)}.", fix="pass a batch in N×C×H×W layout")
    for axis, (got, want) in enumerate(zip(x.shape, shape)):
        if isinstance(want, int) and want >= 0 and got != want:
            raise SedeployError(f"{engine}: input '{name}' has shape {tuple(x.shape)}, but dimension {axis} "
                                f"must be {want} (engine input {_fmt_shape(shape)}).",
                                fix="preprocess to the input size the model was exported for")
    return np.ascontiguousarray(x)


def _fmt_shape(shape: list) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else "?" for d in shape) + "]"
