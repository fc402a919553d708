"""``sedeploy serve``: one engine behind a real Triton Inference Server on this machine.

The server is the ``tritonserver`` that ``nvidia-pytriton`` ships, with Triton's python backend: ``sedeploy serve``
writes a one-model repository whose ``model.py`` is :mod:`sedeploy.serving.python_model` (the engine runs through
sedeploy's runner inside Triton's python stub) and starts ``tritonserver`` on it. Triton does the rest: the
dynamic batcher (requests from many clients are grouped into one engine call), HTTP/REST and gRPC (KServe v2
protocol), ``/v2/health/live`` and ``/v2/health/ready``, Prometheus metrics on ``/metrics``.

Bad requests: Triton checks every request against the model's signature (data type, C×H×W, batch ≤
max_batch_size) before batching; the model checks each request again, values included (NaN, ±inf), before it runs
the batch. A bad request gets its own 400 error naming what is wrong; the requests batched with it are served.

Life cycle, as Triton and systemd expect it: the ports are checked before anything starts (free on the host, all
different); SIGINT (Ctrl-C) or SIGTERM — to this process or to its whole process group — stops the server:
tritonserver gets SIGINT, finishes the requests in flight for up to ``exit_timeout_s``, and is killed (with its
stubs) if it is still there a few seconds later; a second signal kills it at once. The command then exits
128 + the signal (130, 143). tritonserver's own output goes to ``--log-file``, or to a temporary file that is
removed when the server stops (its error lines are quoted in sedeploy's error when it fails to start); stdout
stays sedeploy's (JSON Lines with ``--json``).

The same engine folder packaged with ``sedeploy package --triton`` runs on Triton's native backends instead (the
NGC container, Kubernetes/KServe); this server is for one machine and for testing that repository's clients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import sedeploy
from sedeploy.errors import SedeployError
from sedeploy.serving import python_model
from sedeploy.serving.env import check_pytriton, server_environment, triton_distribution
from sedeploy.serving.process import TritonProcess, die_with_parent, remove_stale_workdirs
from sedeploy.serving.triton_config import TensorSpec, parse_config, read_results
from sedeploy.serving.triton_repo import plan_models

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
    exit_timeout_s: int = 10  # how long tritonserver lets requests in flight finish when it is stopped
    start_timeout_s: float = 300.0  # how long the engine may take to load before start-up is given up
    log_file: str | Path | None = None  # tritonserver's output (default: a temporary file, removed at the end)

    def check(self) -> None:
        """Refuse values Triton would reject or silently change, naming the option."""
        def bad(option: str, value: Any, expected: str, fix: str) -> SedeployError:
            return SedeployError(f"{option} {value} is not valid.", expected=expected, fix=fix)

        for option, port in (("--port", self.http_port), ("--grpc-port", self.grpc_port),
                             ("--metrics-port", self.metrics_port)):
            if not 1 <= port <= 65535:
                raise bad(option, port, "a TCP port between 1 and 65535", f"e.g. {option} "
                          f"{DEFAULT_PORTS[['--port', '--grpc-port', '--metrics-port'].index(option)]}")
        if self.max_batch is not None and self.max_batch < 1:
            raise bad("--max-batch", self.max_batch, "a positive integer (the largest batch Triton forms)",
                      "e.g. --max-batch 32, or --no-batching to run every request alone")
        if self.queue_delay_us is not None and self.queue_delay_us < 0:
            raise bad("--queue-delay-us", self.queue_delay_us, "0 or more microseconds", "e.g. --queue-delay-us 100")
        if self.threads is not None and self.threads < 1:
            raise bad("--threads", self.threads, "a positive integer", "omit it to use the physical cores")
        if self.exit_timeout_s < 0:
            raise bad("--exit-timeout", self.exit_timeout_s, "0 or more seconds", "e.g. --exit-timeout 10")
        if self.start_timeout_s <= 0:
            raise bad("start timeout", self.start_timeout_s, "positive seconds", "use the default")
        if self.preferred is not None and any(b < 1 for b in self.preferred):
            raise bad("preferred batch sizes", self.preferred, "positive integers", "e.g. 8,16")
        if self.log_file is not None and Path(self.log_file).is_dir():
            raise SedeployError(f"--log-file '{self.log_file}' is a folder.",
                                expected="a file path for tritonserver's output",
                                fix=f"pass a file, e.g. --log-file {Path(self.log_file) / 'tritonserver.log'}")


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
    log_file: str | None = None  # tritonserver's output when --log-file was given
    is_alive: Any = None  # callable: is tritonserver still up
    stopped_by: int | None = None  # the signal that stopped the server (SIGINT, SIGTERM), None otherwise

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()
                if k not in ("is_alive", "stopped_by")}


class StopRequest:
    """SIGINT/SIGTERM as seen by the server: the first asks for a graceful stop, a second for an immediate one."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.force = threading.Event()
        self.signum: int | None = None

    def __call__(self, signum: int, frame=None) -> None:
        if self.requested.is_set():
            self.force.set()
            return
        self.signum = signum
        self.requested.set()


class StartInterrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM) while the server was starting; it was shut down again."""

    def __init__(self, served: ServedModel) -> None:
        super().__init__(f"stopped while starting {served.name}")
        self.served = served


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


# ------------------------------------------------------------------------------------------- checks before start
def check_ports(host: str, ports: dict[str, int]) -> None:
    """Every port differs from the others and can be bound on ``host`` now; else one error naming the option,
    the port and the fix (tritonserver itself would fail only after a long start-up, or talk to another server)."""
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port in seen:
            raise SedeployError(f"{seen[port]} and {option} are both {port}.",
                                expected="three different ports for HTTP, gRPC and metrics",
                                fix=f"give {option} another port, e.g. {option} {port + 1}")
        seen[port] = option
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for option, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise SedeployError(f"Port {port} ({option}) on {host} is already in use by another program "
                                        "(another server?).",
                                        fix=f"stop that program, or pass {option} with a free port") from None
                if err.errno == errno.EACCES:
                    raise SedeployError(f"Port {port} ({option}) on {host} needs privileges to listen on.",
                                        fix=f"pass {option} 1024 or above") from None
                raise SedeployError(f"Cannot listen on {host}:{port} ({option}): {err.strerror or err}.",
                                    fix="check --host (an address of this machine, e.g. 127.0.0.1 or 0.0.0.0)"
                                    ) from None


def open_log_file(path: Path):
    """The user's --log-file, opened for appending (it collects tritonserver's output over runs)."""
    try:
        return open(path, "ab")
    except OSError as err:
        raise SedeployError(f"Cannot write the log file '{path}' ({err.strerror or err}).",
                            fix="pass --log-file in a folder that exists and is writable") from None


def _plan(engines_dir, engine, o: ServeOptions):
    bench = read_results(o.results) if o.results is not None else None
    models = plan_models(engines_dir, results=bench, max_batch=o.max_batch or 32)
    m = _pick(models, engines_dir, engine)
    if m.max_batch_size == 0 and o.batching:
        log.info("%s has a fixed batch: Triton's dynamic batcher is off for it.", m.engine.name)
    batching = o.batching and m.max_batch_size > 0
    if o.max_batch is not None and m.backend == "trt" and o.max_batch > m.max_batch_size:
        raise SedeployError(f"--max-batch {o.max_batch} exceeds the TensorRT profile of '{m.engine.name}' "
                            f"(max {m.max_batch_size}).", fix=f"pass --max-batch ≤ {m.max_batch_size}")
    if o.max_batch is not None and m.backend == "trt":
        m.max_batch_size = o.max_batch
    preferred = list(o.preferred) if o.preferred else [b for b in m.preferred if b <= m.max_batch_size]
    if batching and any(b < 1 or b > m.max_batch_size for b in preferred):
        raise SedeployError(f"Preferred batch sizes {preferred} do not fit max_batch_size {m.max_batch_size}.",
                            expected=f"sizes between 1 and {m.max_batch_size}")
    delay = o.queue_delay_us if o.queue_delay_us is not None else m.queue_delay_us
    inp, out = m.inputs[0], m.outputs[0]
    params = {**m.parameters, "sedeploy.engine": str(Path(m.engine).resolve())}
    if o.threads is not None:
        params["sedeploy.threads"] = str(o.threads)
    if batching:
        model = dataclasses.replace(m, preferred=preferred, queue_delay_us=delay, parameters=params)
    else:  # no batcher: the batch is part of the shape (any size when the engine takes any)
        fixed = m.max_batch_size == 0 and inp.shape and inp.shape[0] > 0
        whole = lambda t: TensorSpec(t.name, t.dtype, [t.shape[0] if fixed else -1, *t.shape[1:]])  # noqa: E731
        model = dataclasses.replace(m, max_batch_size=0, preferred=[], queue_delay_us=0, parameters=params,
                                    inputs=[whole(t) for t in m.inputs], outputs=[whole(t) for t in m.outputs])
    served = ServedModel(name=m.name, engine=m.engine, backend=m.backend, input_name=inp.name,
                         input_shape=inp.shape[1:], output_name=out.name, num_classes=int(out.shape[-1]),
                         max_batch_size=model.max_batch_size, preferred=model.preferred,
                         queue_delay_us=model.queue_delay_us,
                         batching_rule=m.batching_rule if batching else
                         ("dynamic batching off" if m.max_batch_size else m.batching_rule),
                         preprocess=json.loads(m.parameters.get("sedeploy.preprocess", "{}")),
                         log_file=str(o.log_file) if o.log_file else None)
    return served, model


# ------------------------------------------------------------------------------------------- the server process
def write_repository(root: Path, model, dist) -> None:
    """The one-model repository (python backend running :mod:`sedeploy.serving.python_model`) and a backend folder
    holding Triton's python backend with the stub built for this Python (Triton looks for the stub there)."""
    d = root / "repository" / model.name
    (d / "1").mkdir(parents=True)
    text = model.config_text(backend="python")
    parse_config(text, where=f"{model.name}/config.pbtxt")
    (d / "config.pbtxt").write_text(text, encoding="utf-8")
    shutil.copyfile(python_model.__file__, d / "1" / "model.py")
    backend = root / "backends" / "python"
    backend.mkdir(parents=True)
    for f in dist.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, backend / f.name)
    shutil.copy2(dist.stub, backend / "triton_python_backend_stub")


def _environment(dist, workdir: Path) -> dict[str, str]:
    """tritonserver's environment: its libraries; the stub's libpython fix (sedeploy.serving.env); this Python's
    environment first on PATH (the stub's embedded Python finds its packages from it); this sedeploy first on
    PYTHONPATH (the stub imports the same sedeploy as this process); TMPDIR in the run's own folder (tritonserver
    writes a ``.ses`` file there), so nothing of the run outlives it."""
    env = dict(os.environ)
    fix = server_environment().get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (fix or env.get("LD_LIBRARY_PATH", ""), str(dist.libs)) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.exec_prefix) / "bin"), env.get("PATH", "")])
    here = str(Path(sedeploy.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    (workdir / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(workdir / "tmp")
    return env


def start_server(model, o: ServeOptions) -> TritonProcess:
    """Start tritonserver on ``model`` (one planned model) in a working folder of its own: the one-model repository,
    the log (``o.log_file`` appended to, else a log in that folder), the environment. A start that fails leaves
    nothing behind: the log file is closed and the folder removed."""
    dist = triton_distribution()
    remove_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"sedeploy-serve-{os.getpid()}-"))
    handle = None
    try:
        if o.log_file:
            log_path = Path(o.log_file)
            handle = open_log_file(log_path)
        else:
            log_path = workdir / "tritonserver.log"
            handle = open(log_path, "ab")
        write_repository(workdir, model, dist)
        args = [str(dist.server), f"--model-repository={workdir / 'repository'}",
                f"--backend-directory={workdir / 'backends'}", "--model-control-mode=none",
                "--strict-readiness=true", f"--exit-timeout-secs={int(o.exit_timeout_s)}",
                f"--http-address={o.host}", f"--http-port={o.http_port}",
                f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
                f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--log-verbose=0",
                # a region prefix of its own: several servers on one machine never share shared memory
                f"--backend-config=python,shm-region-prefix-name=sedeploy{os.getpid()}{os.urandom(3).hex()}_"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                env=_environment(dist, workdir), preexec_fn=die_with_parent)
    except BaseException:
        if handle is not None:
            handle.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return TritonProcess(proc, workdir, log_path, handle, keep_log=bool(o.log_file))


def _get(host: str, port: int, path: str) -> int | None:
    """HTTP status of GET path, None when nothing answers."""
    conn = http.client.HTTPConnection(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _wait_ready(server: TritonProcess, served: ServedModel, o: ServeOptions, stop: StopRequest | None) -> bool:
    """True once the model answers ready; False when a stop was requested first; an error when tritonserver
    exits or does not get ready in time."""
    deadline = time.monotonic() + o.start_timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.requested.is_set():
            return False
        if server.proc.poll() is not None:
            lines = server.error_lines()
            raise SedeployError(f"tritonserver exited while starting '{served.engine.name}' (exit code "
                                f"{server.proc.returncode})" + (": " + " | ".join(lines) if lines else "."),
                                fix="see the server's output with --log-file FILE" if not server.keep_log else
                                f"read the server log {server.log_path}")
        if _get(o.host, o.http_port, f"/v2/models/{served.name}/ready") == 200:
            return True
        if stop is not None:
            stop.requested.wait(0.2)
        else:
            time.sleep(0.2)
    raise SedeployError(f"tritonserver did not get '{served.engine.name}' ready within {o.start_timeout_s:.0f} s.",
                        fix="check the server's output (--log-file FILE); a large engine may need a longer start")


@contextlib.contextmanager
def running_server(engines_dir: str | Path, engine: str | None = None, options: ServeOptions | None = None,
                   *, stop: StopRequest | None = None) -> Iterator[ServedModel]:
    """Start tritonserver with the engine, yield what is served once it is ready, and always stop it (within
    its exit timeout + KILL_GRACE_S) and remove its temporary files. ``stop``: a request to stop (the signals of
    :func:`serve`); when it comes during start-up, :class:`StartInterrupted` is raised after the shutdown."""
    o = options or ServeOptions()
    o.check()
    check_pytriton()
    served, model = _plan(engines_dir, engine, o)
    check_ports(o.host, {"--port": o.http_port, "--grpc-port": o.grpc_port, "--metrics-port": o.metrics_port})
    server = start_server(model, o)
    try:
        if not _wait_ready(server, served, o, stop):
            raise StartInterrupted(served)
        served.http_url = f"http://{o.host}:{o.http_port}"
        served.grpc_url = f"{o.host}:{o.grpc_port}"
        served.metrics_url = f"http://{o.host}:{o.metrics_port}/metrics"
        served.is_alive = lambda: server.proc.poll() is None
        yield served
    finally:
        try:
            server.stop(o.exit_timeout_s, stop.force if stop is not None else None)
        finally:
            server.close()


def serve(engines_dir: str | Path, engine: str | None = None, *, options: ServeOptions | None = None,
          on_ready=None) -> ServedModel:
    """Serve until SIGINT or SIGTERM (to this process or its process group), then stop tritonserver and its
    stubs (see the module docstring). ``on_ready(served)`` is called once the model answers (the CLI prints the
    URLs there), never when a signal came first. Returns what was served, ``stopped_by`` = the signal."""
    stop = StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            with running_server(engines_dir, engine, options, stop=stop) as served:
                if not stop.requested.is_set() and on_ready is not None:
                    on_ready(served)
                while not stop.requested.wait(0.5):
                    if not served.is_alive():
                        raise SedeployError(f"tritonserver serving '{served.name}' stopped on its own.",
                                            fix="read the server's output (--log-file FILE) for the reason")
                log.info("Stopping tritonserver (%s).", served.name)
        except StartInterrupted as err:
            served = err.served
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    served.stopped_by = stop.signum
    return served
