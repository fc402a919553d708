"""Checks on ONNX artifacts, one module per job:

- :mod:`~sedeploy.checks.precision` — per-node precision summary of any model;
- :mod:`~sedeploy.checks.trt_qdq` — TensorRT's explicit-quantization rules (:mod:`~sedeploy.checks.trt_rules`);

and :func:`inspect_model`, what ``sedeploy inspect`` reports (the precision table, plus the TensorRT Q/DQ check
for quantized models).
"""
from __future__ import annotations

from sedeploy.checks.precision import format_precision, summarize_graph, summarize_precision
from sedeploy.checks.trt_qdq import ValidationReport, Violation, check_trt_qdq, format_report, rules_table
from sedeploy.onnxcore import Graph, as_model, default_opset, is_quantized

__all__ = ["format_precision", "summarize_graph", "summarize_precision", "ValidationReport", "Violation",
           "check_trt_qdq", "format_report", "rules_table", "inspect_model", "format_inspection"]


def inspect_model(path) -> dict:
    """What ``sedeploy inspect`` reports: ``{"path", "opset", "precision": summarize_precision(...),
    "trt_qdq": check_trt_qdq(...).as_dict() or None, "ok"}``.

    The TensorRT Q/DQ check runs only on quantized models: an FP32/FP16 model has no INT8 rules to break, so
    ``trt_qdq`` is None and ``ok`` True. ``ok`` is False when a quantized model breaks a TensorRT rule (errors;
    warnings do not count).
    """
    proto, label = as_model(path, what="model to inspect")
    report = check_trt_qdq(proto) if is_quantized(proto) else None
    if report is not None:
        report.model = label
    return {"path": label, "opset": default_opset(proto),
            "precision": report.precision if report is not None else summarize_graph(Graph(proto)),
            "trt_qdq": report.as_dict() if report is not None else None,
            "ok": report.ok if report is not None else True}


def format_inspection(d: dict) -> str:
    """:func:`inspect_model`'s dict as text: the precision table, then the TensorRT verdict and violations."""
    lines = [f"{d['path']} (opset {d['opset']})", format_precision(d["precision"])]
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
