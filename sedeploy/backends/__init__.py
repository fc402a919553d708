"""Engine backends: a *builder* turns an ONNX file into an engine artifact, a *runner* executes one.

Two backends share the vocabulary defined here:

- :mod:`sedeploy.backends.ort` — ONNX Runtime (CPU by default). Its "engine" is ORT's own optimized graph.
- :mod:`sedeploy.backends.tensorrt` — TensorRT (optional, NVIDIA GPU). Its engine is a serialized plan.

Every engine file is published together with a JSON *sidecar* (``<stem>.ort.json`` / ``<stem>.trt.json``) that
records what it was built from and with what (library version, device, precision, source sha256). The sidecar is
a separate file on purpose: the engine file stays byte-for-byte what the library produced and can be loaded by
other tools, and the runner can refuse a plan built for another library version before touching the GPU.

Runners have one interface: ``.input_name``, ``.input_shape``, ``.run(x: np.ndarray) -> np.ndarray`` (the first
output), ``.describe()``, and they are context managers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_write_text

__all__ = ["EngineArtifact", "graph_precision", "read_sidecar", "write_sidecar", "validate_input"]

#: Ops whose presence means the graph computes in int8: explicit Q/DQ (what TensorRT wants) and the QOperator
#: / integer forms ONNX Runtime's quantizer can emit.
_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
             "QLinearConv", "QLinearMatMul", "QGemm"}


@dataclass
class EngineArtifact:
    """What a builder produced: the engine file, its sidecar, and the sidecar's content."""

    path: Path
    sidecar: Path
    backend: str  # "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8", as read from the graph
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sidecar": str(self.sidecar), "backend": self.backend,
                "precision": self.precision, "metadata": self.metadata}


def _load_proto(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise SedeployError(f"The ONNX file '{path}' does not exist.", fix="check the path")
    from google.protobuf.message import DecodeError

    try:  # only types are needed: external weight files need not be present
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as err:
        raise SedeployError(f"'{path}' is not a readable ONNX file ({type(err).__name__}: {err}).",
                            fix="re-export it (`sedeploy export`) or re-copy the file") from err


def graph_precision(model) -> str:
    """Precision a graph computes in, read from the graph itself: ``"int8"``, ``"fp16"`` or ``"fp32"``.

    Q/DQ (or QOperator) nodes → int8; otherwise any float16 tensor (initializer, graph input/output, value_info,
    Constant, Cast target) → fp16; otherwise fp32. This is what decides TensorRT's precision: TensorRT 11 builds
    exactly the types the graph contains, and on 10.x the builder flags are chosen from this answer.
    ``model`` is an ``onnx.ModelProto`` or a path.
    """
    import onnx

    proto = _load_proto(model)
    graph = proto.graph
    if any(n.op_type in _INT8_OPS for n in graph.node):
        return "int8"
    fp16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == fp16 for t in graph.initializer):
        return "fp16"
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == fp16:
            return "fp16"
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                return "fp16"
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16:
                return "fp16"
    return "fp32"


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
