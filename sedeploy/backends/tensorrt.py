"""TensorRT backend (10.x and 11.x): build a serialized plan from an ONNX file, and run it.

``tensorrt`` is imported only inside functions: this module imports, and its pure parts are tested, anywhere.

Precision is the graph's, by construction. Every network is built strongly typed: on 10.x with
``1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` (no FP16/INT8 builder flags: weak typing lets
TensorRT pick layer precisions, so one ONNX gave different engines on 10 and 11); on 11 no flag is passed (every
network is strongly typed; the flag is deprecated and ignored). An FP32 ONNX builds an FP32 engine, the FP16
artifact an FP16 engine, the INT8 artifact (Q/DQ inside the FP16 graph) int8 convolutions with FP16 everywhere
else. Before any build the input is checked (:func:`validate_trt_input`): the strong-typing check for every model,
TensorRT's Q/DQ rules for INT8, and the QOperator CPU form refused. After the build, each layer's precision is read
from the engine inspector (``profiling_verbosity = DETAILED``; inspected through an execution context set to the
profile's opt shape; both JSON layouts: 10.x "Format/Datatype", 11.x "Format" + "Datatype") and recorded in the
sidecar, the layers whose precision could not be read listed under ``unreadable_layers``. Every value TensorRT
returns is checked (None, False, -1, a parser error) and turned into one error naming the step. TensorRT's TF32
default is kept (and recorded): FP32 engines on Ampere+ use TF32 convolutions.

A plan is tied to the exact TensorRT version and GPU architecture. The JSON sidecar (``<stem>.trt.json``) records
both, and the CUDA version TensorRT was built for; :class:`TrtRunner` checks them before deserializing. GPU
buffers are torch tensors (``data_ptr()``, a torch stream's ``cuda_stream``), allocated once per engine for the
profile's largest batch, with pinned host staging buffers and non-blocking copies on one stream; a CUDA build of
torch is required.

Package choice (``pip install 'sedeploy[tensorrt]'`` installs ``tensorrt>=10,<12``): the ``tensorrt`` meta wheel
pulls ``tensorrt-cu12`` or ``tensorrt-cu13`` from NVIDIA's index; pick the one matching the CUDA major of your
driver and of torch (``pip install tensorrt-cu12`` for CUDA 12.x drivers, ``tensorrt-cu13`` for CUDA 13.x —
``python -c "import torch; print(torch.version.cuda)"`` tells torch's).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy import __version__
from sedeploy.backends import (Engine, EngineOptions, Runner, read_sidecar, sidecar_path, validate_input,
                               write_sidecar)
from sedeploy.backends.trt_build import (add_batch_profile, check_build_request, check_plan_compatible, inspect_plan,
                                         network_input, parse_trt_version, profile_shapes, validate_profile,
                                         validate_trt_input)
from sedeploy.backends.trt_support import (STRONGLY_TYPED_MAJOR, load_timing_cache, save_timing_cache,
                                           strongly_typed_flags, tensorrt_cuda_version, timing_cache_path)
from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.fsutil import atomic_path, ensure_writable_dir
from sedeploy.onnxcore import sha256_file

log = logging.getLogger("sedeploy")

__all__ = ["STRONGLY_TYPED_MAJOR", "parse_trt_version", "trt_version", "require_trt", "validate_profile",
           "profile_shapes", "validate_trt_input", "build_engine", "build_trt_engine", "check_plan_compatible",
           "cuda_device", "trt_logger", "TrtRunner"]

#: TensorRT data type names → numpy dtype names (IO tensors sedeploy feeds / reads).
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
           "INT64": "int64", "BOOL": "bool"}


def _import_trt(purpose: str):
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:  # OSError: the wheel is there but libnvinfer cannot be loaded
        raise MissingDependencyError("tensorrt", "tensorrt", purpose) from err
    return trt


def trt_version() -> tuple[int, int, int] | None:
    """The installed TensorRT version, or None when ``tensorrt`` is not importable."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    return parse_trt_version(trt.__version__)


def require_trt(purpose: str) -> tuple[tuple[int, int, int], dict[str, str]]:
    """Fail early, with the fix, when TensorRT or a CUDA GPU is missing; else (TensorRT version, GPU description).

    Called before any long work (export, calibration) so that `--backend trt` on a CPU machine costs nothing."""
    trt = _import_trt(purpose)
    return parse_trt_version(trt.__version__), cuda_device()


def cuda_device() -> dict[str, str]:
    """The CUDA device TensorRT builds and runs on, as sidecars record it: ``gpu`` (name), ``compute_capability``,
    ``cuda_runtime`` (torch's CUDA version), ``device_index``; the error says how to fix a machine without one."""
    import torch

    if not torch.cuda.is_available():
        raise SedeployError(
            f"No CUDA GPU is visible to PyTorch (torch {torch.__version__}, CUDA build: {torch.version.cuda}).",
            expected="an NVIDIA GPU with its driver, and a CUDA build of torch (sedeploy moves TensorRT's "
                     "input and output buffers with torch)",
            fix="run on a GPU machine; `nvidia-smi` must list the GPU and `python -c \"import torch; "
                "print(torch.cuda.is_available())\"` must print True (a '+cpu' torch cannot)")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "cuda_runtime": str(torch.version.cuda), "device_index": str(index)}


#: the tensorrt module the logger was made for, and the logger
_LOGGER: tuple[Any, Any] | None = None


def trt_logger(trt):
    """One process-wide TensorRT logger (TensorRT keeps the first one it is given) that also keeps the recent
    messages, so that failures can quote TensorRT's own explanation. It is made once per ``trt`` module: another
    module given in its place (a stand-in) gets a logger of its own."""
    global _LOGGER
    if _LOGGER is None or _LOGGER[0] is not trt:
        sev = trt.ILogger.Severity

        class _CapturingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: list[str] = []

            def log(self, severity, msg):
                if severity == sev.VERBOSE:
                    return
                self.lines = [*self.lines[-199:], f"[{getattr(severity, 'name', severity)}] {msg}"]
                level = (logging.ERROR if severity in (sev.INTERNAL_ERROR, sev.ERROR) else
                         logging.WARNING if severity == sev.WARNING else logging.DEBUG)
                log.log(level, "TensorRT: %s", msg)

            def take(self) -> str:
                text, self.lines = "\n".join(self.lines), []
                return text

        _LOGGER = (trt, _CapturingLogger())
    return _LOGGER[1]


def build_engine(onnx_path: str | Path, out_dir: str | Path, options: EngineOptions | None = None, *,
                 source_as: str | Path | None = None) -> Engine:
    """The backend-table entry point: :func:`build_trt_engine` with the options that concern TensorRT."""
    o = options or EngineOptions()
    return build_trt_engine(onnx_path, out_dir, min_batch=o.min_batch, opt_batch=o.opt_batch, max_batch=o.max_batch,
                            workspace_gib=o.workspace_gib, timing_cache=o.timing_cache, source_as=source_as)


def build_trt_engine(onnx_path: str | Path, out_dir: str | Path, *, min_batch: int = 1, opt_batch: int = 8,
                     max_batch: int = 32, workspace_gib: float = 4.0, timing_cache: str | Path | None = None,
                     input_name: str | None = None, source_as: str | Path | None = None) -> Engine:
    """Build ``<stem>.plan`` and ``<stem>.trt.json`` in ``out_dir`` from ``onnx_path``, strongly typed.

    The batch dimension gets one optimization profile (min/opt/max); ``workspace_gib`` caps TensorRT's scratch
    memory; ``timing_cache`` names a cache file: the one actually used carries the TensorRT version and compute
    capability in its name (:func:`~sedeploy.backends.trt_support.timing_cache_path`), and is merged, not
    overwritten, under a file lock. ``source_as``: the path the sidecar records as the engine's source (where the
    artifact is published, when it is built in a staging folder; default: the artifact's path).
    """
    src = Path(onnx_path)
    # before TensorRT is even imported: a wrong input costs nothing
    typing, precision = check_build_request(src, min_batch, opt_batch, max_batch, workspace_gib)
    trt = _import_trt("Building a TensorRT engine")
    version = parse_trt_version(trt.__version__)
    device = cuda_device()
    out = ensure_writable_dir(out_dir)
    plan_path, sidecar = out / f"{src.stem}.plan", out / f"{src.stem}.trt.json"
    cache_path = timing_cache_path(timing_cache, trt.__version__, device["compute_capability"]) \
        if timing_cache is not None else None
    logger = trt_logger(trt)
    logger.take()

    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network_flags = strongly_typed_flags(trt, version)
    network = builder.create_network(network_flags)
    if network is None:
        raise SedeployError(f"TensorRT {trt.__version__} could not create a network (flags {network_flags}):\n"
                            f"{logger.take()}")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SedeployError(f"TensorRT {trt.__version__}'s ONNX parser rejected '{src}':\n{errors}\n{logger.take()}",
                            fix="check the ops against TensorRT's ONNX operator support matrix; Q/DQ graphs "
                                "must be symmetric int8 (all zero points 0)")
    tensor = network_input(network, input_name, src)
    shapes = profile_shapes(tuple(tensor.shape), min_batch, opt_batch, max_batch)

    config = builder.create_builder_config()
    if config is None:
        raise SedeployError(f"TensorRT could not create a builder configuration:\n{logger.take()}")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precisions in the inspector
    add_batch_profile(builder, config, tensor.name, shapes, str(src), logger)
    cache_bytes = load_timing_cache(config, cache_path) if cache_path is not None else 0
    tf32 = bool(config.get_flag(trt.BuilderFlag.TF32)) if hasattr(trt.BuilderFlag, "TF32") else None

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SedeployError(f"TensorRT {trt.__version__} could not build an engine from '{src}' on "
                            f"{device['gpu']}:\n{logger.take()}",
                            fix="read TensorRT's messages above; a larger --workspace or a smaller MAX in "
                                "--trt-profile MIN,OPT,MAX helps when tactics run out of memory")
    seconds = time.perf_counter() - t0
    layers = inspect_plan(trt, serialized, logger, tensor.name, shapes[1], str(src))
    if layers["unreadable"]:
        log.warning("TensorRT's engine inspector gave no readable precision for %d of %d layers of '%s' (first: "
                    "%s): the sidecar lists them under 'unreadable_layers'.", len(layers["unreadable"]),
                    len(layers["layers"]), plan_path.name, layers["unreadable"][0])
    cache_saved = save_timing_cache(config, cache_path) if cache_path is not None else None
    with atomic_path(plan_path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    metadata = {
        "backend": "trt", "sedeploy_version": __version__, "tensorrt_version": trt.__version__,
        "tensorrt_cuda": tensorrt_cuda_version(trt),
        **{k: v for k, v in device.items() if k != "device_index"},
        "precision": precision, "builder_flags": [], "tf32": tf32, "strongly_typed": True,
        "network_flags": network_flags, "strong_typing": typing,
        "layer_precisions": layers["counts"], "layers": layers["layers"],
        "unreadable_layers": layers["unreadable"], "inspector_layout": layers["layout"],
        "inspected_shape": list(shapes[1]),
        "profile": {"input": tensor.name, "min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])},
        "workspace_gib": workspace_gib, "source_model": str(source_as or src), "source_sha256": sha256_file(src),
        "plan_sha256": sha256_file(plan_path), "build_seconds": round(seconds, 3),
        "timing_cache": str(cache_path) if cache_path is not None else None,
        "timing_cache_bytes_loaded": cache_bytes, "timing_cache_saved": cache_saved,
    }
    try:
        write_sidecar(sidecar, metadata)
    except BaseException:
        plan_path.unlink(missing_ok=True)  # a plan without its sidecar cannot be checked: do not publish it,
        sidecar.unlink(missing_ok=True)  # and a previous plan's sidecar would describe a file that is gone
        raise
    log.info("Built %s (%s, %s) in %.1f s; layers by precision: %s.", plan_path, precision, device["gpu"], seconds,
             json.dumps(layers["counts"]))
    return Engine(path=plan_path, sidecar=sidecar, backend="trt", precision=precision, source=Path(source_as or src),
                  metadata=metadata)


def sidecar_for(plan_path: str | Path) -> Path:
    return sidecar_path(plan_path)


class _HostStream:
    """Stands in for a CUDA stream when the runner's buffers are on the CPU (tests with tests/fake_tensorrt.py):
    copies are synchronous there, so there is nothing to wait for; its handle is 0."""

    cuda_stream = 0

    def synchronize(self) -> None:
        pass


class TrtRunner(Runner):
    """Runs a sedeploy-built TensorRT plan (the :class:`~sedeploy.backends.Runner` protocol).

    Construction checks the sidecar (TensorRT version, GPU architecture, plan hash) without touching the GPU
    beyond asking which one it is; ``activate()`` deserializes the plan, creates the execution context and
    allocates, once, device buffers for the profile's largest batch plus pinned host staging buffers.
    ``infer(x)`` copies into the staging buffer, then host→device, execute, device→host, all non-blocking on one
    stream, and waits once at the end.

    ``device`` (torch.device): where the I/O buffers live; default the GPU the plan was built for. A CPU device is
    for tests that stand a fake ``tensorrt`` module in (tests/fake_tensorrt.py): addresses are then host
    addresses, copies synchronous, and the stream handle 0.
    """

    backend = "trt"
    timer_coverage = ("TensorRT execute_async_v3 with host↔device copies through pinned buffers allocated once: "
                      "host numpy batch in → host numpy logits out")

    def runs_on(self) -> str:
        return "cuda"

    def __init__(self, plan_path: str | Path, *, sidecar: str | Path | None = None, device=None):
        super().__init__(plan_path)
        if not self.path.is_file():
            raise SedeployError(f"The TensorRT plan '{self.path}' does not exist.", fix="check the path")
        self.meta = read_sidecar(sidecar or sidecar_for(self.path), engine=self.path)
        trt = _import_trt("Running a TensorRT engine")
        self._device = cuda_device()
        check_plan_compatible(self.meta, trt.__version__, self._device, str(self.path))
        if self.meta.get("plan_sha256") not in (None, sha256_file(self.path)):
            raise SedeployError(f"The sidecar of '{self.path}' describes a different plan (sha256 differs).",
                                fix="rebuild the engine, or pass the matching sidecar=")
        self._torch_device = device
        self.engine = self.context = self._runtime = self._stream = None
        self._device_buffers: dict[str, Any] = {}
        self._host_buffers: dict[str, Any] = {}

    def _activate(self) -> None:
        import torch

        trt = _import_trt("Running a TensorRT engine")
        self._logger = logger = trt_logger(trt)
        logger.take()
        self._runtime = trt.Runtime(logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SedeployError(f"TensorRT could not deserialize '{self.path}':\n{logger.take()}",
                                fix="rebuild the engine on this machine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise SedeployError(f"TensorRT could not create an execution context for '{self.path}' (out of GPU "
                                f"memory?):\n{logger.take()}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self.output_names:
            raise SedeployError(f"'{self.path}' has inputs {inputs} and outputs {self.output_names}.",
                                expected="one image-batch input and at least one output")
        self.input_name = inputs[0]
        self.input_shape = [int(d) if int(d) >= 0 else None for d in self.engine.get_tensor_shape(self.input_name)]
        self._dtypes = {n: self._numpy_dtype(n) for n in names}
        self.input_dtype = self._dtypes[self.input_name]
        profile = [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0)]
        if len(profile) != 3:
            raise SedeployError(f"TensorRT reports no optimization profile for input '{self.input_name}' of "
                                f"'{self.path}' (got {profile}).", fix="rebuild the engine with sedeploy")
        lo, opt, hi = profile
        self.profile = {"min": lo, "opt": opt, "max": hi}
        device = self._torch_device or torch.device("cuda", int(self._device["device_index"]))
        self._torch_device = device
        # One stream of our own (TensorRT warns that the legacy default stream costs extra synchronization).
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else _HostStream()
        # Buffers for the largest batch, once: the output shapes for it come from TensorRT itself.
        if not self.context.set_input_shape(self.input_name, hi):
            raise SedeployError(f"TensorRT refused the profile's largest input shape {hi} for '{self.path.name}'.")
        shapes = {self.input_name: hi, **{n: tuple(int(d) for d in self.context.get_tensor_shape(n))
                                          for n in self.output_names}}
        unresolved = {n: shape for n, shape in shapes.items() if any(d < 0 for d in shape)}
        if unresolved:
            raise SedeployError(f"TensorRT left output shapes unresolved for input shape {hi} of '{self.path.name}': "
                                f"{unresolved}.\n{logger.take()}",
                                expected="every output shape known once the input shape is set")
        pin = device.type == "cuda"
        for name, shape in shapes.items():
            dtype = torch.from_numpy(np.empty(0, self._dtypes[name])).dtype
            self._device_buffers[name] = torch.empty(shape, dtype=dtype, device=device)
            self._host_buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=pin)

    def _numpy_dtype(self, name: str) -> np.dtype:
        dt = self.engine.get_tensor_dtype(name)
        kind = getattr(dt, "name", str(dt).rsplit(".", 1)[-1])
        if kind not in _DTYPES:
            raise SedeployError(f"'{self.path}': tensor '{name}' is {kind}, which sedeploy's runner cannot feed "
                                "or read from numpy.", expected=f"one of {', '.join(_DTYPES)}")
        return np.dtype(_DTYPES[kind])

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = validate_input(x, name=self.input_name, dtype=self.input_dtype, shape=self.input_shape,
                           engine=f"TensorRT ({self.path.name})")
        lo, hi = self.profile["min"][0], self.profile["max"][0]
        n = x.shape[0]
        if not lo <= n <= hi:  # before any TensorRT call
            raise SedeployError(f"Batch {n} is outside the engine's optimization profile {lo}..{hi} "
                                f"('{self.path.name}').",
                                fix=f"split the batch into chunks of at most {hi}, or rebuild with a --trt-profile "
                                    f"MIN,OPT,MAX that covers {n}")
        ctx, stream = self.context, self._stream
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise SedeployError(f"TensorRT refused input shape {tuple(x.shape)} for '{self.path.name}':\n"
                                f"{self._logger.take()}")
        views = {self.input_name: self._device_buffers[self.input_name][:n]}
        for name in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            buf = self._device_buffers[name]
            if shape[1:] != tuple(buf.shape[1:]) or shape[0] > buf.shape[0]:
                raise SedeployError(f"TensorRT reports output '{name}' of shape {shape} for batch {n}; the buffer "
                                    f"allocated for the profile holds {tuple(buf.shape)}.")
            views[name] = buf[:shape[0]]
        for name, view in views.items():  # every I/O tensor, before execute
            if not ctx.set_tensor_address(name, view.data_ptr()):
                raise SedeployError(f"TensorRT refused the address of tensor '{name}' for '{self.path.name}':\n"
                                    f"{self._logger.take()}")
        host_in = self._host_buffers[self.input_name][:n]
        host_in.copy_(torch.from_numpy(x))
        with torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else contextlib.nullcontext():
            views[self.input_name].copy_(host_in, non_blocking=True)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise SedeployError(f"TensorRT failed to run '{self.path.name}':\n{self._logger.take()}")
            first = self.output_names[0]
            host_out = self._host_buffers[first][:views[first].shape[0]]
            host_out.copy_(views[first], non_blocking=True)
        stream.synchronize()
        return host_out.numpy().copy()  # the staging buffer is reused by the next call

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"tensorrt_version": self.meta.get("tensorrt_version"), "gpu": self._device["gpu"],
                  "compute_capability": self._device["compute_capability"], "precision": self.meta.get("precision"),
                  "layer_precisions": self.meta.get("layer_precisions")})
        if self.engine is not None:
            d.update({"outputs": self.output_names, "profile": {k: list(v) for k, v in self.profile.items()}})
        return d

    def _deactivate(self) -> None:
        self._device_buffers, self._host_buffers = {}, {}
        self.context = self.engine = self._runtime = self._stream = None  # context before engine before runtime
