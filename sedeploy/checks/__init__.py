"""Checks on ONNX artifacts, one module per job:

- :mod:`~sedeploy.checks.precision` — per-node precision summary of any model;
- :mod:`~sedeploy.checks.trt_qdq` — TensorRT's explicit-quantization rules (:mod:`~sedeploy.checks.trt_rules`);
- :mod:`~sedeploy.checks.strong_typing` — element types as TensorRT's strongly typed parser assigns them;

and :func:`inspect_model`, what ``sedeploy inspect`` reports (the precision table, the strong-typing check, plus
the TensorRT Q/DQ check for quantized models).
"""
from __future__ import annotations

from sedeploy.checks.precision import format_precision, summarize_graph, summarize_precision
from sedeploy.checks.strong_typing import (StrongTypingReport, check_strong_typing, format_strong_typing,
                                           require_strong_typing)
from sedeploy.checks.trt_qdq import ValidationReport, Violation, check_trt_qdq, format_report, rules_table
from sedeploy.onnxcore import META, Graph, as_model, default_opset, get_metadata, is_quantized

__all__ = ["format_precision", "summarize_graph", "summarize_precision", "ValidationReport", "Violation",
           "check_trt_qdq", "format_report", "rules_table", "inspect_model", "format_inspection", "StrongTypingReport",
           "check_strong_typing", "format_strong_typing", "require_strong_typing"]


def inspect_model(path) -> dict:
    """What ``sedeploy inspect`` reports: ``{"path", "opset", "precision": summarize_precision(...),
    "strong_typing": check_strong_typing(...).as_dict(), "trt_qdq": check_trt_qdq(...).as_dict() or None, "ok"}``.

    The strong-typing check runs on every model. The TensorRT Q/DQ check runs only on quantized models: an
    FP32/FP16 model has no INT8 rules to break, so ``trt_qdq`` is None. ``ok`` is False when the typing is
    inconsistent or a quantized model breaks a TensorRT rule (errors; warnings do not count).
    """
    proto, label = as_model(path, what="model to inspect")
    report = check_trt_qdq(proto) if is_quantized(proto) else None
    if report is not None:
        report.model = label
    typing = check_strong_typing(proto)
    typing.model = label
    flavour = get_metadata(proto).get(META.FLAVOUR)  # sedeploy's INT8 artifacts say which backend they are for
    return {"path": label, "opset": default_opset(proto), "int8_flavour": flavour,
            "precision": report.precision if report is not None else summarize_graph(Graph(proto)),
            "strong_typing": typing.as_dict(),
            "trt_qdq": report.as_dict() if report is not None else None,
            "ok": typing.ok and (report.ok if report is not None else True)}


def format_inspection(d: dict) -> str:
    """:func:`inspect_model`'s dict as text: the precision table, then the TensorRT verdict and violations."""
    lines = [f"{d['path']} (opset {d['opset']})", format_precision(d["precision"])]
    st = d["strong_typing"]
    lines.append(format_strong_typing(StrongTypingReport(
        model=st["model"], errors=[Violation(**v) for v in st["errors"]], compute_ops=st["compute_ops"],
        fp32_ops=st["fp32_ops"], boundary_casts=st["boundary_casts"])))
    rep = d["trt_qdq"]
    if rep is None:
        lines.append("TensorRT Q/DQ check: not applicable (no quantization nodes; TensorRT builds the graph in the "
                     "float types it states)")
        return "\n".join(lines)
    report = ValidationReport(model=rep["model"], opset=rep["opset"], precision=rep["precision"], qdq=rep["qdq"],
                              errors=[Violation(**v) for v in rep["errors"]],
                              warnings=[Violation(**v) for v in rep["warnings"]])
    lines.append(format_report(report, precision=False))
    return "\n".join(lines)
