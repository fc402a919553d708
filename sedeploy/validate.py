"""Prove that a Q/DQ ONNX artifact is one TensorRT builds as INT8 — and say, per node, what precision a graph runs in.

TensorRT 11 removed calibrators and precision flags: every network is strongly typed, so INT8 exists only where
the ONNX graph says so with QuantizeLinear/DequantizeLinear (Q/DQ) pairs, and TensorRT's ONNX parser accepts
only one flavour of them. An artifact that breaks those rules fails late (at engine build, on a GPU machine) or,
worse, builds with layers silently left in float. :func:`check_trt_qdq` finds that on any machine, before a GPU
is involved, and names for every violation the node, the rule, what was found and how to fix it.

Errors are what TensorRT rejects or what makes the INT8 graph wrong; warnings are NVIDIA's placement advice
(where Q/DQ costs accuracy or blocks fusions). The rules and their sources are listed in :data:`RULES`
(sedeploy/validate_rules.py).

:func:`summarize_precision` works on any model (FP32, FP16, INT8): op type → how many nodes compute in int8
(data inputs arrive through DequantizeLinear), fp16 or fp32 — what ``sedeploy inspect`` prints.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.validate_rules import (  # noqa: F401  (re-exported: part of validate's API)
    ONNX_SPEC, ONNX_TRT_OPS, QOPERATOR_OPS, RULES, SENSITIVE_OPS, TRT_GUIDE, WEIGHTED_OPS, Rule)

log = logging.getLogger("sedeploy")

#: Nodes that move or relabel data without computing: they do not count as "compute" in summaries.
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant", "Identity")
_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity")
_FLOAT_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}  # TensorProto FLOAT, FLOAT16, BFLOAT16, DOUBLE
_INT64, _BOOL, _UINT8, _INT8, _INT32 = 7, 9, 2, 3, 6


# ----------------------------------------------------------------------------------------------------------- graph
class Graph:
    """Read-only index over an ONNX graph: producers, consumers, constants and element types of every tensor.

    Element types come from graph inputs, initializers and value_info, then are propagated in node order (Cast,
    Q/DQ and a few integer/bool-producing ops are typed exactly; other ops take their first input's type), so no
    shape inference run is needed and huge models are not copied.
    """

    def __init__(self, model):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.initializers = {t.name: t for t in g.initializer if t.name not in self.graph_inputs}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self._names = {id(n): n.name or f"<{n.op_type} #{k}>" for k, n in enumerate(self.nodes)}
        self.dtype = self._element_types()

    def name(self, node) -> str:
        return self._names[id(node)]

    def is_const(self, tensor: str) -> bool:
        return tensor in self.initializers or tensor in self.constant_nodes

    def const(self, tensor: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.constant_nodes.get(tensor)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.asarray(a.f if a.name == "value_float" else a.i)
                if a.name in ("value_floats", "value_ints"):
                    return np.asarray(list(a.floats) if a.name == "value_floats" else list(a.ints))
        return None

    def made_by(self, tensor: str, op_type: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def _element_types(self) -> dict[str, int]:
        g = self.model.graph
        types: dict[str, int] = {}
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in self.nodes:
            if not n.output or all(o in types for o in n.output if o):
                continue
            out = _output_type(n, types)
            if out:
                for o in n.output:
                    if o and o not in types:
                        types[o] = out
        return types


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _output_type(node, types: dict[str, int]) -> int | None:
    op = node.op_type
    if op == "Cast":
        return _attr(node, "to")
    if op == "Constant":
        t = _attr(node, "value")
        return t.data_type if t is not None else None
    if op == "QuantizeLinear":
        if len(node.input) > 2 and node.input[2]:
            return types.get(node.input[2])
        return _attr(node, "output_dtype") or _UINT8
    if op == "DequantizeLinear":
        return _attr(node, "output_dtype") or types.get(node.input[1])
    if op in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero"):
        return _INT64
    if op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN",
              "IsInf"):
        return _BOOL
    for i in node.input:
        if i and i in types:
            return types[i]
    return None


def _load(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory model>"
    path = Path(model)
    if not path.is_file():
        raise SedeployError(f"The ONNX file '{path}' does not exist.", fix="pass the path of an .onnx file")
    try:
        return onnx.load(str(path)), str(path)
    except Exception as err:  # protobuf raises DecodeError and friends; one clear message for all of them
        raise SedeployError(f"'{path}' is not a readable ONNX model ({type(err).__name__}: {err}).",
                            expected="an .onnx file (protobuf ModelProto)") from err


def default_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


# ------------------------------------------------------------------------------------------------ precision summary
def _node_precision(graph: Graph, node) -> str:
    """int8 when every non-constant float data input (and a weighted op's weight) comes through DequantizeLinear;
    otherwise the float type the node reads; "other" for nodes without float inputs/outputs."""
    if node.op_type in QOPERATOR_OPS:  # QLinearConv, ConvInteger, …: integer arithmetic by definition
        return "int8"
    data = [i for i in node.input if i and graph.dtype.get(i) in _FLOAT_PRECISION and not graph.is_const(i)]
    via_dq = [i for i in data if graph.made_by(i, "DequantizeLinear")]
    if data and len(via_dq) == len(data):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or graph.made_by(node.input[1],
                                                                                     "DequantizeLinear"):
            return "int8"
    for t in (*data, *[i for i in node.input if i], *[o for o in node.output if o]):
        p = _FLOAT_PRECISION.get(graph.dtype.get(t))
        if p:
            return p
    return "other"


def _summarize(graph: Graph) -> dict:
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
        t = _attr(n, "value")
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
    proto, _ = _load(model)
    return _summarize(Graph(proto))


# ------------------------------------------------------------------------------------------------------ validator
@dataclass(frozen=True)
class Violation:
    rule: str
    severity: str
    node: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.found}. Fix: {self.fix}"


@dataclass
class ValidationReport:
    model: str
    opset: int | None
    errors: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    precision: dict = field(default_factory=dict)
    qdq: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules(self, severity: str | None = None) -> set[str]:
        """Ids of the rules violated (``severity`` "error" / "warning" to restrict)."""
        found = {"error": self.errors, "warning": self.warnings}
        return {v.rule for s, vs in found.items() if severity in (None, s) for v in vs}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class _Checker:
    """One pass per rule family over a :class:`Graph`; each finding becomes a :class:`Violation`."""

    def __init__(self, graph: Graph, report: ValidationReport):
        self.g, self.report = graph, report

    def add(self, rule: str, node, found: str, fix: str | None = None) -> None:
        r = RULES[rule]
        where = node if isinstance(node, str) else f"{node.op_type} '{self.g.name(node)}'"
        v = Violation(rule, r.severity, where, found, fix or r.fix)
        (self.report.errors if r.severity == "error" else self.report.warnings).append(v)

    # -- model level
    def opset_and_ops(self) -> None:
        opset = default_opset(self.g.model)
        if opset is None or opset < 13:
            self.add("opset", "<model>", f"default-domain opset {opset}")
        for n in self.g.nodes:
            if n.op_type in QOPERATOR_OPS or (n.domain == "com.microsoft" and n.op_type in
                                               ("QuantizeLinear", "DequantizeLinear")):
                self.add("qoperator", n, f"{n.domain or 'ai.onnx'}::{n.op_type}")
            elif n.domain not in ("", "ai.onnx"):
                self.add("custom-domain", n, f"operator {n.domain}::{n.op_type}")

    # -- Q/DQ parameters
    def qparams(self, n) -> None:
        g = self.g
        x, scale_name = n.input[0], n.input[1]
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if not g.is_const(scale_name) or (zp_name and not g.is_const(zp_name)):
            self.add("qparam-not-constant", n, "scale/zero point is not an initializer or Constant")
            return
        scale = g.const(scale_name)
        if scale.size == 0 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            bad = scale[~(np.isfinite(scale) & (scale > 0))] if scale.size else scale
            self.add("scale-invalid", n, f"scale values {bad.ravel()[:4].tolist()} (of {scale.size})")
        if n.op_type == "QuantizeLinear":
            qtype = g.dtype.get(zp_name) if zp_name else (_attr(n, "output_dtype") or _UINT8)
        else:
            qtype = g.dtype.get(x) or (g.dtype.get(zp_name) if zp_name else None)
        if n.op_type == "DequantizeLinear" and qtype == _INT32:
            self.add("int32-dequantize", n, f"DequantizeLinear of int32 tensor '{x}'")
        elif qtype is not None and qtype != _INT8:
            import onnx

            what = onnx.TensorProto.DataType.Name(qtype).lower()
            extra = " (QuantizeLinear without a zero point produces uint8)" if not zp_name and \
                n.op_type == "QuantizeLinear" else ""
            self.add("zero-point-dtype", n, f"quantized type {what}{extra}")
        if zp_name:
            zp = g.const(zp_name)
            if np.any(zp != 0):
                self.add("zero-point-nonzero", n, f"zero point {zp.ravel()[np.flatnonzero(zp)[:4]].tolist()} "
                                                  f"({int(np.count_nonzero(zp))} of {zp.size} non-zero)")
        if scale.size > 1 or scale.ndim > 1:
            self.per_channel(n, scale)

    def per_channel(self, n, scale: np.ndarray) -> None:
        g = self.g
        weight = self._weight_source(n)
        if weight is None:
            self.add("activation-per-channel", n, f"{scale.size} scales on activation '{n.input[0]}'")
            return
        if scale.ndim > 1:
            self.add("weight-axis", n, f"blocked scale of shape {list(scale.shape)} on weight '{weight}'",
                     "use per-channel (1-D) scales for INT8 weights")
            return
        shape = g.const(weight).shape
        axis = _attr(n, "axis", 1)
        axis = axis + len(shape) if axis < 0 else axis
        dq_nodes = [n] if n.op_type == "DequantizeLinear" else \
            [c for c in g.consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        uses = [(c, k) for d in dq_nodes for c in g.consumers.get(d.output[0], [])
                for k, i in enumerate(c.input) if i == d.output[0]]
        for consumer, index in uses:
            expected = _expected_weight_axis(consumer, index, len(shape))
            if expected is None:
                self.add("per-channel-not-weight", n, f"per-channel scales reach input {index} of "
                                                      f"{consumer.op_type} '{g.name(consumer)}'")
            elif axis != expected:
                self.add("weight-axis", n, f"axis {axis} for the weight of {consumer.op_type} "
                                           f"'{g.name(consumer)}' (expected {expected})")
        if 0 <= axis < len(shape) and scale.size != shape[axis]:
            self.add("weight-axis", n, f"{scale.size} scales for axis {axis} of size {shape[axis]}")

    def _weight_source(self, n) -> str | None:
        """The constant a Q/DQ node quantizes (through a Q for DQ nodes), or None for activations."""
        x = n.input[0]
        if self.g.is_const(x):
            return x
        q = self.g.made_by(x, "QuantizeLinear") if n.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and self.g.is_const(q.input[0]) else None

    def pairs(self, q) -> None:
        g = self.g
        out = q.output[0]
        others = [c for c in g.consumers.get(out, []) if c.op_type != "DequantizeLinear"]
        if others or out in g.graph_outputs:
            what = ", ".join(f"{c.op_type} '{g.name(c)}'" for c in others) or "a graph output"
            self.add("q-without-dq", q, f"int8 output '{out}' used by {what}")
        for dq in (c for c in g.consumers.get(out, []) if c.op_type == "DequantizeLinear"):
            if not all(g.is_const(i) for i in (*q.input[1:3], *dq.input[1:3]) if i):
                continue  # run-time scales cannot be compared; qparam-not-constant reports them
            same = all(_same_const(g, a, b) for a, b in zip(q.input[1:3], dq.input[1:3])) and \
                len(q.input) == len(dq.input) and _attr(q, "axis", 1) == _attr(dq, "axis", 1)
            if not same:
                self.add("qdq-pair-mismatch", dq, f"scale/zero point differ from QuantizeLinear '{g.name(q)}'")

    def dq_source(self, dq) -> None:
        x = dq.input[0]
        if not self.g.is_const(x) and not self.g.made_by(x, "QuantizeLinear"):
            src = self.g.producer.get(x)
            self.add("dq-input-not-q", dq, f"input '{x}' comes from "
                                           f"{src.op_type + ' ' + repr(self.g.name(src)) if src else 'a graph input'}")

    # -- weighted ops and placement
    def weighted(self, n) -> None:
        g = self.g
        if len(n.input) < 2 or not _is_weight(g, n.input[1]):
            return
        act_q = bool(g.made_by(n.input[0], "DequantizeLinear"))
        w_q = bool(g.made_by(n.input[1], "DequantizeLinear"))
        if act_q != w_q:
            which = "data input quantized, weight float" if act_q else "weight quantized, data input float"
            self.add("mixed-weighted", n, which)
        elif not act_q:
            self.add("weighted-op-float", n, f"input '{n.input[0]}' and weight '{n.input[1]}' are float")

    def sensitive(self, n) -> None:
        if n.input and self.g.made_by(n.input[0], "DequantizeLinear"):
            self.add("sensitive-op-quantized", n, f"input '{n.input[0]}' comes through DequantizeLinear")

    def residual_add(self, n, depth: dict[str, int]) -> None:
        g = self.g
        if len(n.input) != 2 or any(g.is_const(i) or _is_weight(g, i) for i in n.input):
            return
        quantized = [bool(g.made_by(i, "DequantizeLinear")) for i in n.input]
        skip = min((0, 1), key=lambda k: depth.get(n.input[k], 0))  # the shorter path is the skip connection
        if all(quantized):
            self.add("residual-add", n, "both inputs are quantized")
        elif not any(quantized):
            self.add("residual-add", n, f"neither input is quantized (skip input '{n.input[skip]}')")
        elif not quantized[skip]:
            self.add("residual-add", n, f"the residual-branch input '{n.input[1 - skip]}' is quantized, the skip "
                                        f"input '{n.input[skip]}' is not")


def _is_weight(g: Graph, tensor: str) -> bool:
    """A constant, possibly behind DequantizeLinear (and QuantizeLinear)."""
    for _ in range(3):
        if g.is_const(tensor):
            return True
        node = g.producer.get(tensor)
        if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            return False
        tensor = node.input[0]
    return False


def _same_const(g: Graph, a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = g.const(a), g.const(b)
    return va is not None and vb is not None and va.shape == vb.shape and bool(np.all(va == vb))


def _expected_weight_axis(consumer, index: int, rank: int) -> int | None:
    """The output-channel axis TensorRT requires for per-channel weights of ``consumer`` (None: not allowed)."""
    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul" and rank == 2:
        return 1
    return None


def _depths(g: Graph) -> dict[str, int]:
    """Longest compute path from the graph inputs to each tensor (Q/DQ/Cast/Identity do not count)."""
    depth: dict[str, int] = {}
    for n in g.nodes:
        d = max((depth.get(i, 0) for i in n.input if i), default=0)
        step = 0 if n.op_type in _PASS_THROUGH else 1
        for o in n.output:
            depth[o] = d + step
    return depth


def check_trt_qdq(model) -> ValidationReport:
    """Check an ONNX model (path or ModelProto) against TensorRT's explicit-quantization rules (:data:`RULES`).

    ``report.ok`` is True when there are no errors; warnings are placement advice. The report also carries the
    per-node precision summary (:func:`summarize_precision`) and Q/DQ counts.
    """
    proto, label = _load(model)
    g = Graph(proto)
    report = ValidationReport(model=label, opset=default_opset(proto))
    check = _Checker(g, report)
    check.opset_and_ops()
    qs = [n for n in g.nodes if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]
    dqs = [n for n in g.nodes if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]
    if not qs and not dqs and not report.rules("error") & {"qoperator"}:
        check.add("no-qdq", "<model>", "0 QuantizeLinear and 0 DequantizeLinear nodes")
    for n in (*qs, *dqs):
        if len(n.input) >= 2:
            check.qparams(n)
    for q in qs:
        check.pairs(q)
    for dq in dqs:
        check.dq_source(dq)
    if qs or dqs:
        depth = _depths(g)
        for n in g.nodes:
            if n.op_type in WEIGHTED_OPS:
                check.weighted(n)
            elif n.op_type in SENSITIVE_OPS:
                check.sensitive(n)
            elif n.op_type == "Add":
                check.residual_add(n, depth)
    per_channel = sum(1 for n in dqs if len(n.input) > 1 and g.is_const(n.input[1])
                      and np.asarray(g.const(n.input[1])).size > 1)
    report.qdq = {"quantize_linear": len(qs), "dequantize_linear": len(dqs), "per_channel_dequantize": per_channel}
    report.precision = _summarize(g)
    return report


# ------------------------------------------------------------------------------------------------------- printing
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


def format_report(report: ValidationReport) -> str:
    """Human-readable :class:`ValidationReport`: verdict, violations grouped by severity, precision table."""
    verdict = "OK" if report.ok else "FAILED"
    lines = [f"TensorRT Q/DQ check of {report.model}: {verdict} ({len(report.errors)} error(s), "
             f"{len(report.warnings)} warning(s))"]
    if report.qdq:
        lines.append(f"  {report.qdq['quantize_linear']} QuantizeLinear, {report.qdq['dequantize_linear']} "
                     f"DequantizeLinear ({report.qdq['per_channel_dequantize']} per-channel weight scales)")
    for title, items in (("Errors", report.errors), ("Warnings", report.warnings)):
        if not items:
            continue
        lines.append(f"{title}:")
        by_rule: dict[str, list[Violation]] = defaultdict(list)
        for v in items:
            by_rule[v.rule].append(v)
        for rule, vs in by_rule.items():
            lines.append(f"  [{rule}] {RULES[rule].summary} — {len(vs)} node(s)")
            for v in vs[:5]:
                lines.append(f"    {v.node}: {v.found}")
            if len(vs) > 5:
                lines.append(f"    … and {len(vs) - 5} more")
            lines.append(f"    Fix: {vs[0].fix}")
    lines.append(format_precision(report.precision))
    return "\n".join(lines)


def rules_table(rules: Iterable[str] | None = None) -> str:
    """The rules (all, or those named) with severity and source, for docs and ``--help`` text."""
    names = list(rules) if rules is not None else list(RULES)
    return "\n".join(f"{n} ({RULES[n].severity}): {RULES[n].summary}. Source: {RULES[n].source}" for n in names)


# ------------------------------------------------------------------------------------------------------ inspection
def _has_quantization(graph: Graph) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type in QOPERATOR_OPS
               for n in graph.nodes)


def inspect_model(path) -> dict:
    """What ``sedeploy inspect`` reports: ``{"path", "opset", "precision": summarize_precision(...),
    "trt_qdq": check_trt_qdq(...).as_dict() or None, "ok"}``.

    The TensorRT Q/DQ check runs only on quantized models (Q/DQ or QOperator nodes): an FP32/FP16 model has no
    INT8 rules to break, so ``trt_qdq`` is None and ``ok`` True. ``ok`` is False when a quantized model breaks a
    TensorRT rule (errors; warnings do not count).
    """
    proto, label = _load(path)
    graph = Graph(proto)
    report = check_trt_qdq(proto) if _has_quantization(graph) else None
    if report is not None:
        report.model = label
    return {"path": label, "opset": default_opset(proto),
            "precision": report.precision if report is not None else _summarize(graph),
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
    text = format_report(report).split("\n")
    precision_lines = format_precision(report.precision).count("\n") + 1
    lines += text[:-precision_lines]  # the precision table is already printed above
    return "\n".join(lines)
