"""Element types as TensorRT's strongly typed ONNX import assigns them, checked before any build.

A strongly typed network (every network on TensorRT 11; ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x)
runs each layer in the type its inputs have; TensorRT chooses nothing. The ONNX parser types the graph like this
(onnx-tensorrt ``onnxOpImporters.cpp``):

- graph inputs and initializers have their declared types; ``Cast`` sets its ``to`` type;
- ``DequantizeLinear`` outputs its *scale's* type (``addDequantize(data, scale, scaleType)``), so a Q/DQ pair with a
  float32 scale makes everything after it float32;
- ``QuantizeLinear`` reads an input of its scale's type;
- every other op needs its float inputs in one type and produces that type (no implicit promotion).

:func:`check_strong_typing` walks the graph with these rules and reports, naming the node, an FP32 scale that
feeds an FP16 region (rule ``strong-typing-scale``) and ops whose float inputs differ in type
(``strong-typing-mixed``) — both fail TensorRT's type inference at build time — and counts the compute ops (all
nodes but Q/DQ, Cast, Constant, Identity) by the float type they are typed in: an FP16 + INT8 artifact whose
count says "fp32: 218" would run in FP32 on TensorRT whatever the file is called.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from sedeploy.checks.precision import BOUNDARY_OPS
from sedeploy.checks.trt_rules import RULES, Violation
from sedeploy.errors import VerificationError
from sedeploy.onnxcore import QOPERATOR_OPS, Graph, as_model, attr
from sedeploy.onnxcore.graph import FLOAT_PRECISION, INT64

#: Inputs (by index) that are not data and may have a float type of their own: Resize's roi and scales.
_NON_DATA_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
_INT64_OPS = ("Shape", "Size", "ArgMax", "ArgMin", "NonZero")
_LISTED = 20  # FP32 op names listed in summaries


@dataclass
class StrongTypingReport:
    model: str
    errors: list[Violation] = field(default_factory=list)
    compute_ops: dict[str, int] = field(default_factory=dict)  # "fp16"/"fp32"/… → compute ops typed so
    fp32_ops: list[str] = field(default_factory=list)  # "Op 'name'" of every compute op typed FP32
    boundary_casts: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict:
        """The short form artifact reports carry."""
        return {"ok": self.ok, "compute_ops": dict(self.compute_ops), "fp32_compute_ops": len(self.fp32_ops),
                "fp32_ops": self.fp32_ops[:_LISTED], "casts": self.boundary_casts,
                "errors": [str(v) for v in self.errors[:_LISTED]]}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _error(report: StrongTypingReport, g: Graph, rule: str, node, found: str) -> None:
    r = RULES[rule]
    report.errors.append(Violation(rule, r.severity, f"{node.op_type} '{g.name(node)}'", found, r.fix))


def _name(elem_type) -> str:
    return FLOAT_PRECISION.get(elem_type, str(elem_type))


def check_strong_typing(model) -> StrongTypingReport:
    """Type the graph (path or ModelProto) as TensorRT's strongly typed parser does; see the module docstring."""
    proto, label = as_model(model)
    g = Graph(proto)
    report = StrongTypingReport(model=label)
    types: dict[str, int] = {}
    for vi in proto.graph.input:
        types[vi.name] = vi.type.tensor_type.elem_type
    for name, t in g.initializers.items():
        types[name] = t.data_type
    dq_scale: dict[str, tuple] = {}  # DQ output → (DQ node, scale type): names the scale in messages
    counts: Counter = Counter()
    for n in g.nodes:
        op = n.op_type
        skip = _NON_DATA_INPUTS.get(op, ())
        floats = [(i, types[i]) for k, i in enumerate(n.input)
                  if i and k not in skip and types.get(i) in FLOAT_PRECISION]
        if op == "Cast":
            out = attr(n, "to")
        elif op == "Constant":
            t = attr(n, "value")
            out = t.data_type if t is not None else g.dtype.get(n.output[0])
        elif op == "QuantizeLinear":
            x, scale = types.get(n.input[0]), types.get(n.input[1])
            if x in FLOAT_PRECISION and scale in FLOAT_PRECISION and x != scale:
                _error(report, g, "strong-typing-scale", n,
                       f"input '{n.input[0]}' is {_name(x)}, scale '{n.input[1]}' is {_name(scale)}")
            zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
            out = types.get(zp) if zp else (attr(n, "output_dtype") or g.dtype.get(n.output[0]))
        elif op == "DequantizeLinear":
            out = types.get(n.input[1])
            dq_scale[n.output[0]] = (n, out)
        elif op in QOPERATOR_OPS or n.domain not in ("", "ai.onnx"):
            out = g.dtype.get(n.output[0]) if n.output else None  # integer kernels: typed by their outputs
        else:
            kinds = {t for _, t in floats}
            if len(kinds) > 1:
                _mixed(report, g, n, floats, dq_scale)
            if op in _INT64_OPS:
                out = INT64
            elif floats:
                out = floats[0][1]
            else:
                out = g.dtype.get(n.output[0]) if n.output else None
        for o in n.output:
            if o and out:
                types[o] = out
        if op == "Cast":
            report.boundary_casts += 1
        if op not in BOUNDARY_OPS and out in FLOAT_PRECISION:
            counts[FLOAT_PRECISION[out]] += 1
            if out == 1:
                report.fp32_ops.append(f"{op} '{g.name(n)}'")
    report.compute_ops = {p: int(counts[p]) for p in ("fp16", "bf16", "fp32", "fp64") if counts[p]}
    return report


def _mixed(report: StrongTypingReport, g: Graph, n, floats: list, dq_scale: dict) -> None:
    majority = Counter(t for _, t in floats).most_common(1)[0][0]
    for tensor, t in floats:
        if tensor in dq_scale and t != majority:
            dq, scale_type = dq_scale[tensor]
            _error(report, g, "strong-typing-scale", n,
                   f"input '{tensor}' is {_name(scale_type)} because DequantizeLinear '{g.name(dq)}' has a "
                   f"{_name(scale_type)} scale, the other inputs are {_name(majority)}")
            return
    _error(report, g, "strong-typing-mixed", n,
           "float inputs of different types: " + ", ".join(f"'{i}' {_name(t)}" for i, t in floats))


def require_strong_typing(model, label: str | None = None) -> StrongTypingReport:
    """:func:`check_strong_typing`, raising :class:`VerificationError` (nothing written) when it fails."""
    report = check_strong_typing(model)
    if not report.ok:
        raise VerificationError(f"'{label or report.model}' is not consistently typed for TensorRT's strongly "
                                f"typed build:\n{format_strong_typing(report)}",
                                fix="keep every Q/DQ scale in the float type of the tensor it quantizes "
                                    "(sedeploy's INT8 TensorRT artifact does) and cast explicitly between "
                                    "float16 and float32 regions")
    return report


def format_strong_typing(report: StrongTypingReport) -> str:
    counts = ", ".join(f"{p} {n}" for p, n in report.compute_ops.items()) or "none"
    lines = [f"Strong typing (TensorRT's parser): {'OK' if report.ok else 'FAILED'}; compute ops typed {counts}; "
             f"{report.boundary_casts} Cast(s)"]
    if report.fp32_ops:
        more = f" … and {len(report.fp32_ops) - _LISTED} more" if len(report.fp32_ops) > _LISTED else ""
        lines.append(f"  FP32 compute ops: {', '.join(report.fp32_ops[:_LISTED])}{more}")
    for v in report.errors[:_LISTED]:
        lines.append(f"  {v}")
    if len(report.errors) > _LISTED:
        lines.append(f"  … and {len(report.errors) - _LISTED} more error(s)")
    return "\n".join(lines)
