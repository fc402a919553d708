"""What one Triton model's ``config.pbtxt`` says, and its check by Triton's own ``ModelConfig`` protobuf.

Backends (Triton's names): TensorRT plans → platform ``tensorrt_plan`` (instance ``KIND_GPU``); ONNX artifacts and
ONNX Runtime engines → platform ``onnxruntime_onnx`` (``KIND_CPU``); OpenVINO IR → backend ``openvino``
(``model.xml`` + ``model.bin``, ``KIND_CPU``).

Dynamic batching: ``max_batch_size`` is the TensorRT profile's max for plans, the static batch of a fixed-batch
ONNX graph (then ``max_batch_size: 0`` and the batch is part of ``dims``), else ``max_batch`` (default 32). With a
bench ``results.json`` (``sedeploy bench ENGINES --out DIR``), the preferred batch sizes are the measured batch
sizes (≤ max_batch_size) whose throughput is at least 90 % of the engine's best, and the queue delay is half the
engine's median batch-1 latency (clamped to 100 µs … 10 ms): a request waits at most half of what serving it alone
costs for company. Without results the defaults are the profile's opt batch (plans) or min(8, max_batch_size),
and a 100 µs delay. ``sedeploy.json`` records which rule chose the values (:func:`batching_policy`).

Every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``)
before it is written (:func:`parse_config`). The repository itself is planned and written by
:mod:`sedeploy.serving.triton_repo`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sedeploy.errors import SedeployError
from sedeploy.serving.env import require_client

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_QUEUE_DELAY_US", "TRITON_BACKENDS", "ONNX_TO_TRITON", "TensorSpec",
           "TritonModel", "parse_config", "read_results", "batching_policy"]

DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 100
NEAR_BEST = 0.90  # a batch size is "preferred" when its throughput is ≥ 90 % of the best measured
DELAY_BOUNDS_US = (100, 10_000)

#: Triton's names per sedeploy backend: (platform, backend, default model file(s), instance kind)
TRITON_BACKENDS: dict[str, dict[str, Any]] = {
    "trt": {"platform": "tensorrt_plan", "backend": "tensorrt", "files": ("model.plan",), "kind": "KIND_GPU"},
    "ort": {"platform": "onnxruntime_onnx", "backend": "onnxruntime", "files": ("model.onnx",), "kind": "KIND_CPU"},
    "openvino": {"platform": "", "backend": "openvino", "files": ("model.xml", "model.bin"), "kind": "KIND_CPU"},
}

#: ONNX TensorProto element type → Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # Triton TYPE_*
    shape: list  # full shape; ints for static dims, -1 for dynamic ones

    def dims(self, batched: bool) -> list[int]:
        return [int(d) for d in (self.shape[1:] if batched else self.shape)]


@dataclass
class TritonModel:
    """One model of the repository, before it is written."""

    name: str
    engine: Path
    backend: str  # sedeploy backend key
    sidecar: Path | None
    entry: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    preferred: list[int] = field(default_factory=list)
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    batching_rule: str = ""
    instances: int = 1
    parameters: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # class names: Triton's classification extension (top-k)

    def config_text(self, *, backend: str | None = None) -> str:
        """config.pbtxt in protobuf text format. ``backend``: run the model on that Triton backend instead of the
        engine's native one (``sedeploy serve`` uses ``python``: the engine runs through sedeploy's runner)."""
        tb = TRITON_BACKENDS[self.backend] if backend is None else {"platform": "", "backend": backend,
                                                                    "kind": "KIND_CPU"}
        batched = self.max_batch_size > 0
        lines = [f'name: "{self.name}"']
        lines.append(f'platform: "{tb["platform"]}"' if tb["platform"] else f'backend: "{tb["backend"]}"')
        lines.append(f"max_batch_size: {self.max_batch_size}")
        for key, tensors in (("input", self.inputs), ("output", self.outputs)):
            for k, t in enumerate(tensors):
                dims = ", ".join(str(d) for d in t.dims(batched))
                label = '\n  label_filename: "labels.txt"' if key == "output" and k == 0 and self.labels else ""
                lines.append(f'{key} {{\n  name: "{t.name}"\n  data_type: {t.dtype}\n  dims: [ {dims} ]{label}\n}}')
        if batched:
            pref = "".join(f"\n  preferred_batch_size: {b}" for b in self.preferred)
            lines.append(f"dynamic_batching {{{pref}\n  max_queue_delay_microseconds: {self.queue_delay_us}\n}}")
        lines.append(f'instance_group {{\n  count: {self.instances}\n  kind: {tb["kind"]}\n}}')
        for k, v in self.parameters.items():
            lines.append(f'parameters {{\n  key: "{k}"\n  value {{ string_value: {json.dumps(v)} }}\n}}')
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- validation
def parse_config(text: str, *, where: str = "config.pbtxt"):
    """Parse ``text`` with Triton's ModelConfig protobuf; a clear error when Triton would reject it."""
    from google.protobuf import text_format
    from google.protobuf.text_format import ParseError

    require_client("Validating Triton model configurations")
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except ParseError as err:
        raise SedeployError(f"{where} does not parse as Triton's ModelConfig: {err}",
                            fix="this is a sedeploy bug; please report it with the engine's sidecar") from err
    return cfg


def _bench_entry(results: dict[str, Any], engine: Path) -> dict[str, Any] | None:
    for e in results.get("engines") or []:
        p = (e.get("info") or {}).get("path")
        if (p and Path(p).name == engine.name) or e.get("name") == engine.name:
            return e
    return None


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``sedeploy bench`` results.json (its per-engine, per-batch timings choose the batching settings)."""
    rp = Path(path)
    if not rp.is_file():
        raise SedeployError(f"The bench results '{rp}' do not exist.",
                            fix="pass the results.json written by `sedeploy bench ENGINES --out DIR`")
    try:
        data = json.loads(rp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SedeployError(f"'{rp}' is not valid JSON ({err}).", fix="pass a bench results.json") from err
    if not isinstance(data, dict) or not isinstance(data.get("engines"), list):
        raise SedeployError(f"'{rp}' is not a bench results file (no 'engines' list).",
                            fix="pass the results.json written by `sedeploy bench ENGINES --out DIR`")
    return data


def batching_policy(engine: Path, max_batch: int, opt_batch: int | None,
                    results: dict[str, Any] | None) -> tuple[list[int], int, str]:
    """(preferred batch sizes, max queue delay in µs, which rule chose them) — see the module docstring."""
    bench = _bench_entry(results, engine) if results else None
    if bench:
        stats = {int(b): s for b, s in (bench.get("batch") or {}).items()
                 if str(b).isdigit() and isinstance(s, dict) and s.get("throughput")}
        fits = {b: s for b, s in stats.items() if b <= max_batch}
        if fits:
            best = max(s["throughput"] for s in fits.values())
            preferred = sorted(b for b, s in fits.items() if s["throughput"] >= NEAR_BEST * best)
            one = stats.get(1, {}).get("latency_ms", {}).get("p50")
            delay = (int(min(max(one * 1000 / 2, DELAY_BOUNDS_US[0]), DELAY_BOUNDS_US[1])) if one
                     else DEFAULT_QUEUE_DELAY_US)
            rule = (f"bench results: batch sizes within {NEAR_BEST:.0%} of the best throughput "
                    f"({best:.1f} img/s) among {sorted(fits)}; queue delay = half the batch-1 median latency "
                    f"({one} ms), clamped to {DELAY_BOUNDS_US[0]}..{DELAY_BOUNDS_US[1]} us" if one else
                    f"bench results (no batch-1 timing: default {DEFAULT_QUEUE_DELAY_US} us delay)")
            return preferred, delay, rule
    pref = opt_batch if opt_batch and opt_batch <= max_batch else min(8, max_batch)
    src = "the TensorRT profile's opt batch" if opt_batch else f"min(8, max_batch_size={max_batch})"
    return [pref], DEFAULT_QUEUE_DELAY_US, f"default (no bench results for this engine): {src}, " \
                                           f"{DEFAULT_QUEUE_DELAY_US} us delay"
