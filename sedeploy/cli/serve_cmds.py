"""`package`, `serve` and `infer`: a Triton model repository, a live Triton server, and a client for it."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from sedeploy.cli.core import emit, emit_line, handle_errors, setup_logging
from sedeploy.cli.options import OUTPUT, json_and_verbose, out, threads
from sedeploy.cli.sections import Command, option
from sedeploy.serving.client import format_infer, infer_images
from sedeploy.serving.server import ServeOptions, serve as serve_engine
from sedeploy.serving.triton_repo import format_package, package_triton

TRITON = "Triton model repository"
SERVER = "Server"
BATCHING = "Dynamic batching"
REQUEST = "Request"

results = option("--results", type=click.Path(path_type=Path), section=BATCHING,
                 help="A bench results.json: its timings choose preferred batch sizes and the queue delay.")


def labels_file(section: str, help: str):
    """--labels-file: class names, one per line (synset_words.txt)."""
    return option("--labels-file", type=click.Path(path_type=Path), section=section,
                  help="Class names (synset_words.txt)" + help)


@click.command(cls=Command)
@click.argument("engines_dir", type=click.Path(path_type=Path))
@option("--triton", is_flag=True, section=TRITON,
        help="Write a Triton Inference Server model repository (the default and only format; accepted for "
             "existing scripts).")
@option("--artifacts", is_flag=True, section=TRITON,
        help="Package the portable ONNX artifacts instead of the engines (ORT engines are tuned for this CPU).")
@option("--instances", type=int, default=1, show_default=True, section=TRITON, help="Model instances per device.")
@option("--max-batch", type=int, default=32, show_default=True, section=BATCHING,
        help="Triton's max_batch_size for dynamic-batch ONNX/OpenVINO models (plans use their profile's max).")
@results
@labels_file(TRITON, ": labels.txt for Triton's classification (top-k) extension.")
@out("The model repository folder (written atomically).", type=click.Path(path_type=Path),
     default="model_repository", show_default=True)
@option("--force", is_flag=True, section=OUTPUT, help="Replace an existing non-empty output folder.")
@json_and_verbose
@handle_errors
def package(engines_dir, triton, artifacts, instances, max_batch, results, labels_file, out, force, as_json,
            verbose):
    """Package a build-engine folder for serving: one Triton model per engine.

    \b
    TensorRT plans → tensorrt_plan (KIND_GPU); ONNX artifacts and ONNX Runtime engines → onnxruntime_onnx
    (KIND_CPU); OpenVINO IR → openvino (KIND_CPU). Every config.pbtxt is parsed with Triton's ModelConfig
    protobuf before the repository is published. Needs `pip install 'sedeploy[serve]'`.
    \b
    Example:  sedeploy package engines/ -o model_repository/
              docker run --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/model_repository:/models \\
                nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
    """
    setup_logging(verbose)
    res = package_triton(engines_dir, out, results=results, max_batch=max_batch, instances=instances, force=force,
                         artifacts=artifacts, labels_file=labels_file)
    emit(res, as_json, format_package(res))


def _ready_printer(as_json: bool):
    def ready(served):
        d = served.as_dict()
        human = (f"serving {served.name} ({served.engine.name}, {served.backend}) — max batch "
                 f"{served.max_batch_size}, preferred {served.preferred}, queue delay {served.queue_delay_us} us\n"
                 f"  HTTP {served.http_url}   gRPC {served.grpc_url}   metrics {served.metrics_url}\n"
                 f"  ready: GET {served.http_url}/v2/health/ready   stop: Ctrl-C or SIGTERM")
        if as_json:
            emit_line(json.dumps({"status": "ready", **d}, default=str))
        else:
            click.echo(human)
            sys.stdout.flush()
    return ready


@click.command(cls=Command)
@click.argument("engines_dir", type=click.Path(path_type=Path))
@option("--engine", section=SERVER, help="Model name or engine file to serve [default: the first FP32 engine].")
@option("--host", default="127.0.0.1", show_default=True, section=SERVER,
        help="Address to listen on (0.0.0.0: all).")
@option("--port", type=int, default=8000, show_default=True, section=SERVER, help="HTTP port (KServe v2 REST).")
@option("--grpc-port", type=int, default=8001, show_default=True, section=SERVER, help="gRPC port.")
@option("--metrics-port", type=int, default=8002, show_default=True, section=SERVER,
        help="Prometheus metrics port.")
@option("--exit-timeout", type=int, default=10, show_default=True, section=SERVER,
        help="Seconds requests in flight may take to finish once Ctrl-C/SIGTERM came (Triton's exit timeout).")
@threads
@option("--no-batching", is_flag=True, section=BATCHING,
        help="Turn Triton's dynamic batcher off (every request runs alone).")
@option("--max-batch", type=int, section=BATCHING,
        help="Largest batch the dynamic batcher forms [default: 32 / the plan's profile max].")
@option("--queue-delay-us", type=int, section=BATCHING, help="Dynamic batcher's max queue delay, microseconds.")
@results
@option("--log-file", type=click.Path(path_type=Path), section=OUTPUT,
        help="File that collects tritonserver's output [default: a temporary file, removed at the end].")
@json_and_verbose
@handle_errors
def serve(engines_dir, engine, host, port, grpc_port, metrics_port, exit_timeout, threads, no_batching, max_batch,
          queue_delay_us, results, log_file, as_json, verbose):
    """Serve one engine with a real Triton Inference Server (PyTriton) until SIGTERM/SIGINT.

    HTTP and gRPC (KServe v2), /v2/health/live and /v2/health/ready, Prometheus /metrics, Triton's dynamic
    batcher. ENGINES_DIR is a build-engine folder. Needs `pip install 'sedeploy[serve]'`.
    With --json, stdout carries JSON Lines: one {"status": "ready", …} object, then {"status": "stopped"}.
    Ctrl-C / SIGTERM stop the server (requests in flight finish) and exit 130 / 143.

    \b
    Examples:
      sedeploy serve engines/                                   the first FP32 engine on :8000/:8001/:8002
      sedeploy serve engines/ --engine se-resnet50.int8-cpu --results results/results.json
                                                                INT8, batching chosen from bench timings
    """
    setup_logging(verbose)
    opts = ServeOptions(host=host, http_port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                        batching=not no_batching, max_batch=max_batch, queue_delay_us=queue_delay_us,
                        results=results, threads=threads, log_file=log_file, exit_timeout_s=exit_timeout)
    served = serve_engine(engines_dir, engine, options=opts, on_ready=_ready_printer(as_json))
    by = signal.Signals(served.stopped_by).name if served.stopped_by else None
    if as_json:
        emit_line(json.dumps({"status": "stopped", "model": served.name, "signal": by}))
    else:
        click.echo(f"stopped {served.name}" + (f" ({by})" if by else ""))
    if served.stopped_by:
        sys.exit(128 + served.stopped_by)  # 130 after Ctrl-C, 143 after SIGTERM, as for every command


@click.command(cls=Command)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@option("--url", default="127.0.0.1:8000", show_default=True, section=REQUEST,
        help="The Triton server's HTTP address.")
@option("--model", section=REQUEST, help="Model name [default: the server's only ready model].")
@option("--top-k", type=int, default=5, show_default=True, section=REQUEST, help="Classes shown per image.")
@labels_file(REQUEST, " [default: $SEDEPLOY_LABELS, else indices].")
@json_and_verbose
@handle_errors
def infer(images, url, model, top_k, labels_file, as_json, verbose):
    """Classify IMAGES on a Triton server: sedeploy's preprocessing, then the top-k classes.

    \b
    Examples:
      sedeploy infer cat.jpg dog.jpg                            top-5 from the server on 127.0.0.1:8000
      sedeploy infer photos/*.jpg --labels-file synset_words.txt --top-k 1 --json
    """
    setup_logging(verbose)
    res = infer_images(list(images), url, model, top_k=top_k, labels_file=labels_file)
    if not as_json:
        res.pop("logits")
    emit(res, as_json, format_infer(res))
