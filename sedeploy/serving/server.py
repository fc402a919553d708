"""``sedeploy serve``: one engine behind a real Triton Inference Server on this machine, through PyTriton.

PyTriton (``nvidia-pytriton``) ships the ``tritonserver`` binary and Triton's python backend; the engine runs in
this process through sedeploy's runner (``open_runner(path).activate()`` → ``infer``), and Triton in front of it
does the rest: the dynamic batcher (requests from many clients are concatenated into one engine call), HTTP/REST
and gRPC (KServe v2 protocol), ``/v2/health/live`` and ``/v2/health/ready``, Prometheus metrics on ``/metrics``.
Triton checks every request against the model's input signature (dtype, C×H×W, batch ≤ max_batch_size) before the
engine sees it; the infer function refuses non-finite pixels. PyTriton reports an error for the whole batch a bad
request was grouped with (it has no per-request errors), so under load a NaN request can fail the requests that
were batched with it; the server keeps serving.

The same engine folder packaged with ``sedeploy package --triton`` runs on Triton's native backends instead (the
NGC container, Kubernetes/KServe); this server is for one machine and for testing that repository's clients.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy")

DEFAULT_PORTS = (8000, 8001, 8002)  # Triton's defaults: HTTP, gRPC, metrics


@dataclass
class ServeOptions:
    """How the engine is served."""

    host: str = "127.0.0.1"
    http_port: int = DEFAULT_PORTS[0]
    grpc_port: int = DEFAULT_PORTS[1]
    metrics_port: int = DEFAULT_PORTS[2]
    batching: bool = True  # Triton's dynamic batcher; False: every request runs alone, as sent
    max_batch: int | None = None  # None: the packaging rule (TensorRT profile max, else 32)
    preferred: list[int] | None = None  # None: the packaging rule (bench results, else default)
    queue_delay_us: int | None = None
    results: str | Path | None = None  # bench results.json that chooses the batching settings
    threads: int | None = None  # engine intra-op threads (CPU backends)
    exit_timeout_s: int = 10
    log_file: str | Path | None = None  # tritonserver's log (default: a temporary file, named in errors)


@dataclass
class ServedModel:
    """What is being served, and where."""

    name: str
    engine: Path
    backend: str
    input_name: str
    input_shape: list  # C, H, W
    output_name: str
    num_classes: int
    max_batch_size: int  # 0 when batching is off
    preferred: list[int]
    queue_delay_us: int
    batching_rule: str
    http_url: str = ""
    grpc_url: str = ""
    metrics_url: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)
    is_alive: Any = None  # callable: is tritonserver (and the model) still up

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items() if k != "is_alive"}


def _pick(models, engines_dir, engine):
    """The model to serve: ``engine`` (a model name, engine file name or path), else the first FP32 engine."""
    if engine is None:
        fp32 = [m for m in models if str(m.entry.get("precision")) == "fp32"]
        return (fp32 or models)[0]
    for m in models:
        if engine in (m.name, m.engine.name, str(m.engine)):
            return m
    raise SedeployError(f"No engine {engine!r} in '{engines_dir}'.",
                        expected="one of " + ", ".join(f"{m.name} ({m.engine.name})" for m in models),
                        fix="pass --engine with one of those names")


def _infer_function(runner, input_name: str, output_name: str, model_name: str):
    from pytriton.decorators import batch

    @batch
    def infer(**inputs):
        x = inputs[input_name]
        if not np.isfinite(x).all():
            raise ValueError(f"{model_name}: input '{input_name}' contains NaN or infinite values; send "
                             "preprocessed finite pixels (sedeploy infer does this)")
        return {output_name: np.ascontiguousarray(runner.infer(x), dtype=np.float32)}

    return infer


@contextlib.contextmanager
def running_server(engines_dir: str | Path, engine: str | None = None,
                   options: ServeOptions | None = None) -> Iterator[ServedModel]:
    """Start tritonserver with the engine bound, yield what is served, and always stop it (the engine too)."""
    from sedeploy.backends import open_runner
    from sedeploy.serving.env import check_pytriton, server_environment

    o = options or ServeOptions()
    check_pytriton()
    from sedeploy.serving.triton_repo import plan_models, read_results

    bench = read_results(o.results) if o.results is not None else None
    models = plan_models(engines_dir, results=bench, max_batch=o.max_batch or 32)
    m = _pick(models, engines_dir, engine)
    if m.max_batch_size == 0 and o.batching:
        log.info("%s has a fixed batch: Triton's dynamic batcher is off for it.", m.engine.name)
    batching = o.batching and m.max_batch_size > 0
    if o.max_batch is not None and m.backend == "trt" and o.max_batch > m.max_batch_size:
        raise SedeployError(f"--max-batch {o.max_batch} exceeds the TensorRT profile of '{m.engine.name}' "
                            f"(max {m.max_batch_size}).", fix=f"pass --max-batch ≤ {m.max_batch_size}")
    preferred = list(o.preferred) if o.preferred else m.preferred
    if batching and any(b < 1 or b > m.max_batch_size for b in preferred):
        raise SedeployError(f"Preferred batch sizes {preferred} do not fit max_batch_size {m.max_batch_size}.",
                            expected=f"sizes between 1 and {m.max_batch_size}")
    delay = o.queue_delay_us if o.queue_delay_us is not None else m.queue_delay_us
    inp, out = m.inputs[0], m.outputs[0]
    served = ServedModel(name=m.name, engine=m.engine, backend=m.backend, input_name=inp.name,
                         input_shape=inp.shape[1:], output_name=out.name, num_classes=int(out.shape[-1]),
                         max_batch_size=m.max_batch_size if batching else 0, preferred=preferred if batching else [],
                         queue_delay_us=delay if batching else 0,
                         batching_rule=m.batching_rule if batching else "dynamic batching off",
                         preprocess=json.loads(m.parameters.get("sedeploy.preprocess", "{}")))
    runner = open_runner(m.engine, threads=o.threads).activate()
    triton, log_file = None, None
    try:
        with _environment(server_environment()):  # PyTriton starts tritonserver with a copy of os.environ
            triton, log_file = _start_triton(served, runner, o, batching)
        yield served
    finally:
        if triton is not None:
            triton.stop()
        runner.deactivate()
    if log_file is not None and o.log_file is None:
        log_file.unlink(missing_ok=True)  # a clean run's temporary server log (kept when something failed)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous values."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_triton(served: ServedModel, runner, o: ServeOptions, batching: bool):
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    if o.log_file:
        log_file = Path(o.log_file)
    else:
        fd, name = tempfile.mkstemp(prefix="sedeploy-tritonserver-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    config = TritonConfig(http_address=o.host, http_port=o.http_port, grpc_address=o.host, grpc_port=o.grpc_port,
                          metrics_address=o.host, metrics_port=o.metrics_port, allow_metrics=True,
                          allow_gpu_metrics=False, exit_timeout_secs=o.exit_timeout_s, log_file=log_file,
                          log_verbose=0)
    c, h, w = (int(d) for d in served.input_shape)
    if batching:
        shape_in, shape_out = (c, h, w), (served.num_classes,)
        mc = ModelConfig(max_batch_size=served.max_batch_size, batcher=DynamicBatcher(
            max_queue_delay_microseconds=served.queue_delay_us, preferred_batch_size=served.preferred or None))
    else:
        shape_in, shape_out = (-1, c, h, w), (-1, served.num_classes)
        mc = ModelConfig(batching=False)
    triton = Triton(config=config)
    try:
        triton.bind(model_name=served.name, infer_func=_infer_function(runner, served.input_name,
                                                                       served.output_name, served.name),
                    inputs=[Tensor(name=served.input_name, dtype=np.float32, shape=shape_in)],
                    outputs=[Tensor(name=served.output_name, dtype=np.float32, shape=shape_out)],
                    config=mc, strict=True)
        triton.run()
    except Exception as err:  # PyTriton raises its own types; name the log that says why
        triton.stop()
        raise SedeployError(f"tritonserver did not start for '{served.engine}': {err}",
                            fix=f"read the server log {log_file}; check that ports {o.http_port}, {o.grpc_port}, "
                                f"{o.metrics_port} are free (--port/--grpc-port/--metrics-port)") from err
    served.http_url = f"http://{o.host}:{o.http_port}"
    served.grpc_url = f"{o.host}:{o.grpc_port}"
    served.metrics_url = f"http://{o.host}:{o.metrics_port}/metrics"
    served.is_alive = triton.is_alive
    return triton, log_file


def serve(engines_dir: str | Path, engine: str | None = None, *, options: ServeOptions | None = None,
          on_ready=None) -> ServedModel:
    """Serve until SIGTERM or SIGINT, then shut tritonserver and the engine down cleanly. ``on_ready(served)`` is
    called once the server answers (the CLI prints the URLs there)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with running_server(engines_dir, engine, options) as served:
            if on_ready is not None:
                on_ready(served)
            while not stop.wait(1.0):
                if not served.is_alive():
                    raise SedeployError(f"tritonserver serving '{served.name}' stopped on its own.",
                                        fix="read the server log (--log-file) for the reason")
            log.info("Stopping tritonserver (%s).", served.name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return served
