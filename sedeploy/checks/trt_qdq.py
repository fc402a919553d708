"""Prove that a Q/DQ ONNX artifact is one TensorRT builds as INT8, naming for every violation the node, the rule,
what was found and how to fix it.

TensorRT 11 removed calibrators and precision flags: every network is strongly typed, so INT8 exists only where
the ONNX graph says so with QuantizeLinear/DequantizeLinear (Q/DQ) pairs, and TensorRT's ONNX parser accepts
only one flavour of them. An artifact that breaks those rules fails late (at engine build, on a GPU machine) or,
worse, builds with layers silently left in float. :func:`check_trt_qdq` finds that on any machine.

Errors are what TensorRT rejects or what makes the INT8 graph wrong; warnings are NVIDIA's placement advice.
The rules and their sources are listed in :data:`sedeploy.checks.trt_rules.RULES`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from sedeploy.checks.precision import format_precision, summarize_graph
from sedeploy.checks.strong_typing import check_strong_typing
from sedeploy.checks.trt_rules import RULES, SENSITIVE_OPS, WEIGHTED_OPS, Violation
from sedeploy.onnxcore import QOPERATOR_OPS, Graph, as_model, attr, compute_depths, default_opset
from sedeploy.onnxcore.graph import INT8, INT32, UINT8


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
            qtype = g.dtype.get(zp_name) if zp_name else (attr(n, "output_dtype") or UINT8)
        else:
            qtype = g.dtype.get(x) or (g.dtype.get(zp_name) if zp_name else None)
        if n.op_type == "DequantizeLinear" and qtype == INT32:
            self.add("int32-dequantize", n, f"DequantizeLinear of int32 tensor '{x}'")
        elif qtype is not None and qtype != INT8:
            import onnx

            what = onnx.TensorProto.DataType.Name(qtype).lower()
            extra = (" (no zero point: uint8 for ONNX and ONNX Runtime, INT8 for TensorRT's parser — the two "
                     "runtimes would compute different values)") if not zp_name and n.op_type == "QuantizeLinear" \
                else ""
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
        axis = attr(n, "axis", 1)
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
                len(q.input) == len(dq.input) and attr(q, "axis", 1) == attr(dq, "axis", 1)
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
        if not _made_by_conv(g, n.input[1 - skip]):
            return  # e.g. the SE scale Mul: no convolution to fuse the Add into, the placement advice does not apply
        if all(quantized):
            self.add("residual-add", n, "both inputs are quantized")
        elif not any(quantized):
            self.add("residual-add", n, f"neither input is quantized (skip input '{n.input[skip]}')")
        elif not quantized[skip]:
            self.add("residual-add", n, f"the residual-branch input '{n.input[1 - skip]}' is quantized, the skip "
                                        f"input '{n.input[skip]}' is not")


def _made_by_conv(g: Graph, tensor: str) -> bool:
    """The tensor is a convolution's output, possibly behind Q/DQ or Cast."""
    for _ in range(4):
        node = g.producer.get(tensor)
        if node is None:
            return False
        if node.op_type in ("Conv", "ConvTranspose"):
            return True
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            return False
        tensor = node.input[0]
    return False


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
        return 0 if attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul" and rank == 2:
        return 1
    return None


def check_trt_qdq(model) -> ValidationReport:
    """Check an ONNX model (path or ModelProto) against TensorRT's explicit-quantization rules (:data:`RULES`),
    strong typing included (:func:`sedeploy.checks.strong_typing.check_strong_typing`).

    ``report.ok`` is True when there are no errors; warnings are placement advice. The report also carries the
    per-node precision summary (:func:`summarize_precision`) and Q/DQ counts.
    """
    proto, label = as_model(model)
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
        depth = compute_depths(g)
        for n in g.nodes:
            if n.op_type in WEIGHTED_OPS:
                check.weighted(n)
            elif n.op_type in SENSITIVE_OPS:
                check.sensitive(n)
            elif n.op_type == "Add":
                check.residual_add(n, depth)
    report.errors += check_strong_typing(proto).errors  # an inconsistently typed graph fails TensorRT's build
    per_channel = sum(1 for n in dqs if len(n.input) > 1 and g.is_const(n.input[1])
                      and np.asarray(g.const(n.input[1])).size > 1)
    report.qdq = {"quantize_linear": len(qs), "dequantize_linear": len(dqs), "per_channel_dequantize": per_channel}
    report.precision = summarize_graph(g)
    return report


def format_report(report: ValidationReport, *, precision: bool = True) -> str:
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
    if precision:
        lines.append(format_precision(report.precision))
    return "\n".join(lines)


def rules_table(rules: Iterable[str] | None = None) -> str:
    """The rules (all, or those named) with severity and source, for docs and ``--help`` text."""
    names = list(rules) if rules is not None else list(RULES)
    return "\n".join(f"{n} ({RULES[n].severity}): {RULES[n].summary}. Source: {RULES[n].source}" for n in names)
