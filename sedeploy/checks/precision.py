"""Per-node precision of any ONNX model: op type → how many nodes compute in int8, fp16 or fp32.

A node computes in int8 when every non-constant float data input (and a weighted op's weight) arrives through
DequantizeLinear (a backend fuses DQ → op → Q into an integer kernel), or when it is a QOperator op; otherwise in
the float type it reads. Q/DQ, Cast, Constant and Identity are boundaries, not compute, and are counted apart.
This is what ``sedeploy inspect`` prints and what every artifact report carries.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from sedeploy.checks.trt_rules import WEIGHTED_OPS
from sedeploy.onnxcore import QOPERATOR_OPS, Graph, as_model, attr, default_opset
from sedeploy.onnxcore.graph import FLOAT_PRECISION

#: Nodes that move or relabel data without computing: they do not count as "compute" in summaries.
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant", "Identity")
_ORDER = ("int8", "fp16", "bf16", "fp32", "fp64", "other")


def _node_precision(graph: Graph, node) -> str:
    """int8 when every non-constant float data input (and a weighted op's weight) comes through DequantizeLinear;
    otherwise the float type the node reads; "other" for nodes without float inputs/outputs."""
    if node.op_type in QOPERATOR_OPS:  # QLinearConv, ConvInteger, …: integer arithmetic by definition
        return "int8"
    data = [i for i in node.input if i and graph.dtype.get(i) in FLOAT_PRECISION and not graph.is_const(i)]
    via_dq = [i for i in data if graph.made_by(i, "DequantizeLinear")]
    if data and len(via_dq) == len(data):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or graph.made_by(node.input[1],
                                                                                     "DequantizeLinear"):
            return "int8"
    for t in (*data, *[i for i in node.input if i], *[o for o in node.output if o]):
        p = FLOAT_PRECISION.get(graph.dtype.get(t))
        if p:
            return p
    return "other"


def summarize_graph(graph: Graph) -> dict:
    import onnx

    model = graph.model
    ops: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    boundary: Counter = Counter()
    for node in graph.nodes:
        if node.op_type in BOUNDARY_OPS:
            boundary[node.op_type] += 1
            continue
        p = _node_precision(graph, node)
        ops[node.op_type][p] += 1
        totals[p] += 1
    inits: dict[str, dict[str, int]] = {}
    for t in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        entry = inits.setdefault(name, {"count": 0, "elements": 0})
        entry["count"] += 1
        entry["elements"] += int(np.prod(t.dims)) if len(t.dims) else 1
    for n in graph.constant_nodes.values():
        t = attr(n, "value")
        if t is not None:
            entry = inits.setdefault(onnx.TensorProto.DataType.Name(t.data_type), {"count": 0, "elements": 0})
            entry["count"] += 1
            entry["elements"] += int(np.prod(t.dims)) if len(t.dims) else 1
    weighted = Counter()
    for op in WEIGHTED_OPS:
        weighted.update(ops.get(op, {}))
    present = [p for p in ("int8", "fp16", "bf16", "fp32", "fp64") if weighted.get(p)] or \
              [p for p in ("int8", "fp16", "bf16", "fp32", "fp64") if totals.get(p)]

    def io(values):
        return {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in values}

    return {
        "precision": "+".join(present) or "none",
        "opset": default_opset(model),
        "ops": {op: {p: int(c[p]) for p in ("int8", "fp16", "bf16", "fp32", "fp64", "other") if c[p]}
                for op, c in sorted(ops.items())},
        "totals": {p: int(totals[p]) for p in ("int8", "fp16", "bf16", "fp32", "fp64", "other") if totals[p]},
        "boundary": {op: int(boundary[op]) for op in BOUNDARY_OPS if boundary[op]},
        "initializers": dict(sorted(inits.items())),
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
    }


def summarize_precision(model) -> dict:
    """Per-node precision of any ONNX model (path or ModelProto).

    Returns ``{"precision": "int8+fp32", "opset", "ops": {op_type: {"int8": n, "fp16": n, "fp32": n, ...}},
    "totals", "boundary": {"QuantizeLinear": n, "DequantizeLinear": n, "Cast": n}, "initializers":
    {dtype: {"count", "elements"}}, "inputs", "outputs"}``. ``precision`` lists the precisions the weighted ops
    (Conv/Gemm/MatMul) run in. Q/DQ, Cast, Constant and Identity are boundaries, not compute, and are counted apart.
    """
    proto, _ = as_model(model)
    return summarize_graph(Graph(proto))


def format_precision(summary: dict) -> str:
    """The per-op-type precision table of :func:`summarize_precision` as text."""
    cols = [p for p in ("int8", "fp16", "bf16", "fp32", "fp64", "other") if summary["totals"].get(p)] or ["fp32"]
    width = max([len("op type"), *(len(op) for op in summary["ops"])])
    lines = [f"Precision: {summary['precision']} (opset {summary['opset']})",
             "  " + "op type".ljust(width) + "".join(c.rjust(7) for c in cols)]
    for op, counts in summary["ops"].items():
        lines.append("  " + op.ljust(width) + "".join(str(counts.get(c, 0)).rjust(7) for c in cols))
    lines.append("  " + "total".ljust(width) + "".join(str(summary["totals"].get(c, 0)).rjust(7) for c in cols))
    if summary["boundary"]:
        lines.append("  boundary nodes: " + ", ".join(f"{n} {op}" for op, n in summary["boundary"].items()))
    inits = ", ".join(f"{d.lower()} {v['count']} ({v['elements']:,} values)" for d, v in summary["initializers"].items())
    lines.append(f"  initializers: {inits or 'none'}")
    io = [f"{k} {v.lower()}" for k, v in (*summary["inputs"].items(), *summary["outputs"].items())]
    lines.append(f"  inputs/outputs: {', '.join(io)}")
    return "\n".join(lines)
