"""The typed record of a portable ONNX artifact (what `build-engine` writes before any backend runs).

An artifact's *kind* is its precision plus, for INT8, its flavour: ``fp32``, ``fp16``, ``int8-trt`` (Q/DQ that
obeys TensorRT's rules) and ``int8-cpu`` (the fastest form on ONNX Runtime's CPU kernels) and ``int8-ov`` (the fastest, most faithful
Q/DQ form for OpenVINO, written for ``--backend openvino``). The kind is a file-name
suffix (``<model>.<kind>.onnx``) and is also written into the file's metadata (:data:`sedeploy.onnxcore.META`),
so :meth:`Artifact.from_file` can tell it from the file alone, renamed or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sedeploy.errors import SedeployError
from sedeploy.layout import INT8_FLAVOURS, MANIFEST, KINDS, artifact_path, artifact_stem
from sedeploy.onnxcore import META, QOPERATOR_OPS, get_metadata, graph_precision, load_onnx

__all__ = ["Artifact", "INT8_FLAVOURS", "KINDS", "MANIFEST", "artifact_path", "artifact_stem"]


@dataclass
class Artifact:
    """One portable ONNX artifact: where it is, what it computes in, and the report of the step that made it."""

    path: Path
    precision: str  # "fp32" | "fp16" | "int8"
    flavour: str | None = None  # "trt" | "cpu" for INT8 artifacts; None otherwise (or unknown)
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.precision not in ("fp32", "fp16", "int8"):
            raise SedeployError(f"Unknown artifact precision {self.precision!r}.", expected="fp32, fp16 or int8")
        if self.flavour is not None and self.flavour not in INT8_FLAVOURS:
            raise SedeployError(f"Unknown INT8 flavour {self.flavour!r} of '{self.path}'.",
                                expected=f"one of {', '.join(INT8_FLAVOURS)}")

    @property
    def kind(self) -> str:
        """``fp32`` / ``fp16`` / ``int8-trt`` / ``int8-cpu`` (``int8`` for an INT8 file of unknown flavour)."""
        return f"{self.precision}-{self.flavour}" if self.flavour else self.precision

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "precision": self.precision, "flavour": self.flavour,
                "report": self.report}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Artifact":
        return cls(Path(d["path"]), d["precision"], d.get("flavour"), dict(d.get("report") or {}))

    @classmethod
    def from_file(cls, path: str | Path, proto=None) -> "Artifact":
        """Describe an ONNX file: precision from the graph itself, flavour from sedeploy's metadata (or, for a
        file without it, "cpu" when it holds QOperator ops; otherwise unknown: None)."""
        proto = proto if proto is not None else load_onnx(path, weights=False, check=False)
        precision = graph_precision(proto)
        flavour = None
        if precision == "int8":
            stated = get_metadata(proto).get(META.FLAVOUR)
            flavour = stated if stated in INT8_FLAVOURS else _infer_flavour(proto)
        return cls(Path(path), precision, flavour)


def _infer_flavour(proto) -> str | None:
    if any(n.op_type in QOPERATOR_OPS for n in proto.graph.node):
        return "cpu"
    return None
