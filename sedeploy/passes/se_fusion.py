"""The SE fusion pass: every Squeeze-and-Excitation block, however it was spelled, rewritten into one form.

Matching lives in :mod:`sedeploy.passes.se_patterns` (pattern + a reason for every non-match; its parts in
:mod:`~sedeploy.passes.se_parts` and :mod:`~sedeploy.passes.se_squeeze`); this module rewrites the matched blocks
with onnx-ir and reports what it did.

Forms (``form=``), chosen by measurement (benchmarks/results/se_fusion_forms/results.md):

- ``"standard"`` (default): ``GlobalAveragePool → Conv1×1(bias) → Relu → Conv1×1(bias) → Sigmoid|HardSigmoid →
  Mul(x, gate)``. Standard ops only, so every backend reads it: TensorRT's ONNX parser maps each op natively, and
  ONNX Runtime's CPU NCHWc transformer keeps GlobalAveragePool (unlike ReduceMean) and both 1×1 convs (with the
  activations folded in) in its blocked layout. The scale Mul stays in plain NCHW: ORT's NCHWc Mul requires both
  operands to have the same shape and deliberately leaves the N×C×H×W · N×C×1×1 broadcast out, so one
  ReorderOutput/ReorderInput pair per block remains; no standard-op spelling removes it (measured, see the
  benchmark). Downstream passes (FP16 keep-lists, INT8 SE policies) recognise this form directly.
- ``"standard-gx"``: the same with ``Mul(gate, x)``; measured only to show the operand order does not matter.
- ``"function"``: each block a call of an ONNX local function ``sedeploy::SEBlock`` (or ``SEBlockHard`` for a
  HardSigmoid gate) whose body is the standard form. TensorRT's parser and ORT inline local functions, so the
  engines equal the standard form's; what remains is a smaller top-level graph, at the cost of hiding the SE ops
  from per-node tools (quantizers, FP16 keep-lists).

Numerics: the rewrite reorders no arithmetic except the squeeze. Where the source squeezed with ReduceMean,
GlobalAveragePool sums in another order; the float32 rounding that follows is ~1e-6 relative to the logits
(2–4e-5 absolute on random-weight SE-ResNet-50 logits of magnitude ~30), which is of the size of ONNX Runtime's
own difference between its optimization levels on the unfused graph (8e-5 there). Graphs whose squeeze already
is GlobalAveragePool come out within 1e-5 absolute (bit-identical when the block was already in form).

Idempotency: a block already in the requested form counts as found and fused, and is left alone
(``already_fused``); ``rewritten`` counts the blocks this call changed. When nothing is rewritten the input
model is returned unchanged (an equal copy). So ``fused`` always means "blocks in fused form in the output":
16 for an exported SE-ResNet-50 whether it came from the dynamo exporter (ReduceMean, all rewritten) or from the
legacy exporter (GlobalAveragePool + Conv, already the standard form).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy.passes")

FORMS = ("standard", "standard-gx", "function")
#: chosen by measurement (benchmarks/results/se_fusion_forms/results.md): fewest ORT reorders tie among the forms, the standard
#: form keeps the SE ops visible to the FP16/INT8 passes and to TensorRT without function inlining.
DEFAULT_FORM = "standard"
FUNCTION_DOMAIN = "sedeploy"
#: (gate, activation between the FCs) → local function name
FUNCTION_NAMES = {("Sigmoid", "Relu"): "SEBlock", ("HardSigmoid", "Relu"): "SEBlockHard",
                  ("Sigmoid", "Relu6"): "SEBlockRelu6", ("HardSigmoid", "Relu6"): "SEBlockHardRelu6"}


@dataclass
class SECandidate:
    """One gate the matcher looked at: the block it matched, or why it was refused."""

    name: str  # "<gate op> '<gate node name>'"
    reason: str | None = None  # None: a matched SE block
    already_fused: bool = False
    variant: dict = field(default_factory=dict)  # how the source spelled it (squeeze, fc, gate, order)
    nodes: list = field(default_factory=list)  # names of the nodes the block spans

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "reason": self.reason, "already_fused": self.already_fused,
                "variant": dict(self.variant), "nodes": list(self.nodes)}


@dataclass
class FusionReport:
    """``found``: SE blocks matched (incl. already fused); ``fused``: blocks in fused form in the output
    (= rewritten + already_fused); ``refused``: (candidate, reason) for every gate that looked like SE but
    was not fused."""

    found: int
    fused: int
    refused: list
    nodes_before: int
    nodes_after: int
    form: str
    rewritten: int = 0
    already_fused: int = 0
    variants: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"found": self.found, "fused": self.fused, "rewritten": self.rewritten,
                "already_fused": self.already_fused, "refused": [{"candidate": c, "reason": r}
                                                                 for c, r in self.refused],
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "form": self.form,
                "variants": dict(self.variants)}


def _to_ir(model):
    import onnx
    import onnx_ir as ir

    if not isinstance(model, onnx.ModelProto):
        raise SedeployError(f"SE fusion was given a {type(model).__name__}.", expected="an onnx.ModelProto",
                            fix="load the file first: sedeploy.onnxcore.load_onnx(path)")
    try:  # shapes (ranks) make the ReduceMean axis check exact; a model ONNX cannot infer is matched without
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError) as err:
        log.debug("shape inference failed (%s); matching without inferred shapes", err)
        inferred = model
    return ir.serde.deserialize_model(inferred)


def _in_form(m, form: str) -> bool:
    """Whether a matched block already is the ``form`` (standard forms only; function calls are not matched)."""
    if form == "function":
        return False
    conv_bias = all(fc.kind == "Conv" and fc.bias is not None for fc in (m.fc1, m.fc2))
    return (m.squeeze_op == "GlobalAveragePool" and len(m.squeeze_nodes) == 1 and conv_bias
            and len(m.gate.nodes) == 1 and len(m.block_nodes) == 6 and m.x_first == (form == "standard"))


def _variant(m) -> dict:
    squeeze = f"ReduceMean(keepdims={m.keepdims})" if m.squeeze_op == "ReduceMean" else m.squeeze_op
    return {"squeeze": squeeze, "fc": m.fc1.kind + ("+bias" if m.fc1.bias is not None else ""), "act": m.act,
            "gate": m.gate.spelling, "mul_order": "x*g" if m.x_first else "g*x"}


def _scan(graph, form: str):
    """(candidates, matches) over the graph's gates, in graph order."""
    from sedeploy.passes.se_patterns import match_block

    candidates, matches, seen = [], [], set()
    for node in list(graph):
        if node.domain == FUNCTION_DOMAIN and node.op_type in FUNCTION_NAMES.values():
            candidates.append(SECandidate(f"{node.op_type} '{node.name}'", already_fused=True,
                                          variant={"form": "function"}, nodes=[node.name]))
            continue
        gate = _candidate_gate(node)
        if gate is None or id(gate.nodes[0]) in seen:
            continue
        seen.update(id(n) for n in gate.nodes)
        label = f"{gate.spelling} '{node.name}'"
        m, result = match_block(node)
        if m is None:
            log.debug("SE candidate %s refused: %s", label, result.reason)
            candidates.append(SECandidate(label, reason=result.reason))
            continue
        done = _in_form(m, form)
        candidates.append(SECandidate(label, already_fused=done, variant=_variant(m),
                                      nodes=[n.name for n in m.block_nodes]))
        matches.append((m, done))
    return candidates, matches


def _candidate_gate(node):
    """The gate ending at ``node`` when it could start an SE block (hard-swish gates are activations: skipped)."""
    from sedeploy.passes.se_parts import is_hard_swish, match_gate

    gate = match_gate(node)
    if gate is None:
        return None
    uses = [u.node for u in gate.out.uses()]
    if len(uses) == 1 and uses[0].op_type == "Mul" and is_hard_swish(gate, uses[0]):
        return None
    return gate


def find_se_blocks(model, *, form: str = DEFAULT_FORM) -> list[SECandidate]:
    """Every SE candidate of ``model`` (an onnx.ModelProto): matched blocks (``.ok``) and refused ones with
    ``.reason``. ``form`` only decides which matched blocks count as ``already_fused``."""
    _check_form(form)
    return _scan(_to_ir(model).graph, form)[0]


@dataclass(frozen=True)
class SEBlockNodes:
    """The node names of one recognised SE block, by role (what precision policies need)."""

    squeeze: tuple[str, ...]  # the pool and any reshape after it
    excite: tuple[str, ...]  # FC1, activation, FC2 (with their reshapes / bias Adds)
    excite_logits: tuple[str, ...]  # the node(s) of the second FC, which produce the gate's input
    gate: tuple[str, ...]  # Sigmoid / HardSigmoid (or its decomposed Add/Clip/Div form)
    scale: str  # the Mul that scales the block's input

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.squeeze, *self.excite, *self.gate, self.scale)


def se_block_nodes(model) -> list[SEBlockNodes]:
    """Every SE block of ``model`` (an onnx.ModelProto whose nodes all have unique names) as node names by role.

    This is the one SE recogniser: the fusion pass, the FP16 keep-FP32 groups and the INT8 SE policy all use the
    matcher of :mod:`sedeploy.passes.se_patterns`, so a block that is fused is also the block a policy keeps.
    """
    from sedeploy.passes.se_patterns import match_block

    names = [n.name for n in model.graph.node]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise SedeployError("SE recognition needs every node to have a unique name.",
                            fix="name the nodes first (sedeploy.onnxcore.name_nodes)")
    blocks, seen = [], set()
    for node in list(_to_ir(model).graph):
        gate = _candidate_gate(node)
        if gate is None or id(gate.nodes[0]) in seen:
            continue
        seen.update(id(n) for n in gate.nodes)
        m, _ = match_block(node)
        if m is None:
            continue
        gate_ids = {id(n) for n in m.gate.nodes}
        squeeze_ids = {id(n) for n in m.squeeze_nodes}
        excite = [n.name for n in m.block_nodes if id(n) not in gate_ids | squeeze_ids and n is not m.mul]
        blocks.append(SEBlockNodes(squeeze=tuple(n.name for n in m.squeeze_nodes), excite=tuple(excite),
                                   excite_logits=tuple(n.name for n in m.fc2.nodes),
                                   gate=tuple(n.name for n in m.gate.nodes), scale=m.mul.name))
    return blocks


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise SedeployError(f"Unknown SE fusion form {form!r}.", expected=f"one of {', '.join(FORMS)}",
                            fix=f"pass form={DEFAULT_FORM!r} (the measured default)")


def fuse_se_blocks(model, *, form: str = DEFAULT_FORM):
    """Rewrite every SE block of ``model`` into ``form``; returns (new onnx.ModelProto, FusionReport).

    The input proto is not modified. Blocks that cannot be fused safely are left as they are and listed in
    ``report.refused`` with the reason (also logged at DEBUG on the ``sedeploy.passes`` logger).
    """
    import onnx
    import onnx_ir as ir

    _check_form(form)
    irmodel = _to_ir(model)
    graph = irmodel.graph
    nodes_before = len(graph)
    candidates, matches = _scan(graph, form)
    names = _NameSource(graph)
    rewritten = 0
    for m, done in matches:
        if done:
            continue
        _rewrite(irmodel, m, form, names)
        rewritten += 1
    refused = [(c.name, c.reason) for c in candidates if not c.ok]
    found = sum(c.ok for c in candidates)
    already = sum(c.ok and c.already_fused for c in candidates)
    if rewritten:
        out = ir.serde.serialize_model(irmodel)
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    report = FusionReport(found=found, fused=rewritten + already, refused=refused, nodes_before=nodes_before,
                          nodes_after=len(out.graph.node), form=form, rewritten=rewritten, already_fused=already,
                          variants=dict(Counter(" / ".join(map(str, c.variant.values())) for c in candidates if c.ok)))
    log.info("SE fusion (%s): %d found, %d fused (%d rewritten, %d already fused), %d refused; nodes %d → %d",
             form, report.found, report.fused, rewritten, already, len(refused), nodes_before, report.nodes_after)
    return out, report


class _NameSource:
    """Fresh, graph-unique names for the values and nodes a rewrite creates."""

    def __init__(self, graph):
        self.used = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None and v.name}
        self.used |= {v.name for v in graph.inputs} | set(graph.initializers) | {n.name for n in graph if n.name}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _rewrite(irmodel, m, form: str, names: _NameSource) -> None:
    import onnx_ir as ir

    graph = irmodel.graph
    base = m.mul.name or m.gate.nodes[-1].name or "se_block"
    base = base[: -len("/Mul")] if base.endswith("/Mul") else base
    x = m.x
    dtype = m.fc1.params[0].dtype or ir.DataType.FLOAT
    np_dtype = dtype.numpy()

    def param(fc, i: int, role: str) -> ir.Value:
        """Conv-ready weight (i=0) or bias (i=1): the original value when it already is one, else a new one."""
        if fc.kind == "Conv" and i < len(fc.params):
            return fc.params[i]
        arr = fc.weight[:, :, None, None] if i == 0 else (
            fc.bias if fc.bias is not None else np.zeros(fc.weight.shape[0], np.float32))
        name = names(f"{base}.{role}.{'weight' if i == 0 else 'bias'}")
        v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arr.astype(np_dtype)), name=name))
        graph.register_initializer(v)
        return v

    w1, b1, w2, b2 = param(m.fc1, 0, "fc1"), param(m.fc1, 1, "fc1"), param(m.fc2, 0, "fc2"), param(m.fc2, 1, "fc2")
    if form == "function":
        fname = FUNCTION_NAMES[(m.gate.kind, m.act)]
        _ensure_function(irmodel, fname)
        attrs = [ir.AttrFloat32("alpha", m.gate.alpha), ir.AttrFloat32("beta", m.gate.beta)] \
            if m.gate.kind == "HardSigmoid" else []
        call = ir.Node(FUNCTION_DOMAIN, fname, [x, w1, b1, w2, b2], attrs, name=names(f"{base}/SEBlock"),
                       num_outputs=1)
        new_nodes, y = [call], call.outputs[0]
    else:
        new_nodes, y = _standard_nodes(graph, x, w1, b1, w2, b2, m, form == "standard", base, names,
                                       _opset(irmodel))
    old_out = m.mul.outputs[0]
    ir.convenience.replace_nodes_and_values(graph, m.mul, m.block_nodes, new_nodes, [old_out], [y])
    _drop_orphans(graph, m.aux_values)


def _opset(irmodel) -> int:
    return int(irmodel.opset_imports.get("", irmodel.opset_imports.get("ai.onnx", 13)))


def _relu6_inputs_or_attrs(opset: int, make_const):
    """Clip(0, 6) bounds: constant inputs from opset 11, attributes before."""
    import onnx_ir as ir

    if opset >= 11:
        return [make_const("min", 0.0), make_const("max", 6.0)], []
    return [], [ir.AttrFloat32("min", 0.0), ir.AttrFloat32("max", 6.0)]


def _standard_nodes(graph, x, w1, b1, w2, b2, m, x_first: bool, base: str, names, opset: int):
    import onnx_ir as ir

    def node(op, inputs, attrs=(), suffix=""):
        n = ir.Node("", op, inputs, list(attrs), name=names(f"{base}/{suffix or op}"), num_outputs=1)
        n.outputs[0].name = names(f"{base}/{(suffix or op).lower()}_output")
        return n

    pool = node("GlobalAveragePool", [x], suffix="squeeze")
    fc1 = node("Conv", [pool.outputs[0], w1, b1], suffix="fc1")
    if m.act == "Relu6":
        def make_const(role, v):
            name = names(f"{base}.relu6.{role}")
            val = ir.Value(name=name, const_value=ir.tensor(np.array(v, dtype=(w1.dtype or ir.DataType.FLOAT).numpy()), name=name))
            graph.register_initializer(val)
            return val

        bounds, attrs = _relu6_inputs_or_attrs(opset, make_const)
        relu = node("Clip", [fc1.outputs[0], *bounds], attrs, suffix="relu6")
    else:
        relu = node("Relu", [fc1.outputs[0]])
    fc2 = node("Conv", [relu.outputs[0], w2, b2], suffix="fc2")
    if m.gate.kind == "HardSigmoid":
        gate = node("HardSigmoid", [fc2.outputs[0]], [ir.AttrFloat32("alpha", m.gate.alpha),
                                                      ir.AttrFloat32("beta", m.gate.beta)], suffix="gate")
    else:
        gate = node("Sigmoid", [fc2.outputs[0]], suffix="gate")
    mul = node("Mul", [x, gate.outputs[0]] if x_first else [gate.outputs[0], x], suffix="scale")
    return [pool, fc1, relu, fc2, gate, mul], mul.outputs[0]


def _ensure_function(irmodel, fname: str) -> None:
    """Add the local function ``sedeploy::fname`` (body = the standard form) once per model."""
    import onnx_ir as ir

    key = (FUNCTION_DOMAIN, fname, "")
    if key in irmodel.functions:
        return
    opset = irmodel.opset_imports.get("", irmodel.opset_imports.get("ai.onnx"))
    x, w1, b1, w2, b2 = (ir.Value(name=n) for n in ("x", "w1", "b1", "w2", "b2"))
    pool = ir.Node("", "GlobalAveragePool", [x], num_outputs=1)
    fc1 = ir.Node("", "Conv", [pool.outputs[0], w1, b1], num_outputs=1)
    consts = []
    if fname.endswith("Relu6"):
        def make_const(role, v):
            c = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(np.array(v, np.float32)))],
                        num_outputs=1)
            c.outputs[0].name = f"relu6_{role}"
            consts.append(c)
            return c.outputs[0]

        bounds, clip_attrs = _relu6_inputs_or_attrs(int(opset), make_const)
        relu = ir.Node("", "Clip", [fc1.outputs[0], *bounds], clip_attrs, num_outputs=1)
    else:
        relu = ir.Node("", "Relu", [fc1.outputs[0]], num_outputs=1)
    fc2 = ir.Node("", "Conv", [relu.outputs[0], w2, b2], num_outputs=1)
    attrs = []
    if fname.startswith("SEBlockHard"):
        gate = ir.Node("", "HardSigmoid", [fc2.outputs[0]],
                       [ir.RefAttr("alpha", "alpha", ir.AttributeType.FLOAT),
                        ir.RefAttr("beta", "beta", ir.AttributeType.FLOAT)], num_outputs=1)
        attrs = [ir.AttrFloat32("alpha", 0.2), ir.AttrFloat32("beta", 0.5)]
    else:
        gate = ir.Node("", "Sigmoid", [fc2.outputs[0]], num_outputs=1)
    mul = ir.Node("", "Mul", [x, gate.outputs[0]], num_outputs=1)
    for i, n in enumerate((pool, fc1, relu, fc2, gate, mul)):
        n.outputs[0].name = f"t{i}"
    mul.outputs[0].name = "y"
    body = ir.Graph([x, w1, b1, w2, b2], [mul.outputs[0]], nodes=[*consts, pool, fc1, relu, fc2, gate, mul],
                    opset_imports={"": opset}, name=fname)
    irmodel.functions[key] = ir.Function(FUNCTION_DOMAIN, fname, graph=body, attributes=attrs)
    irmodel.opset_imports.setdefault(FUNCTION_DOMAIN, 1)


def _drop_orphans(graph, values) -> None:
    """Remove constants the old block read and nothing uses any more (initializers, Constant nodes)."""
    for v in values:
        if v.uses() or v.is_graph_output() or v.is_graph_input():
            continue
        if v.is_initializer() and v.name in graph.initializers:
            del graph.initializers[v.name]
        producer = v.producer()
        if producer is not None and producer.op_type == "Constant" and not any(o.uses() for o in producer.outputs):
            graph.remove(producer, safe=True)
