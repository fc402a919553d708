"""Recognising Squeeze-and-Excitation blocks in an ONNX graph (onnx-ir), with a reason for every non-match.

An SE block computes ``y = x * gate(FC2(relu(FC1(mean_HW(x)))))``. Exporters and hand-written models spell the
same arithmetic in many ways, and every stage below accepts the spellings met in practice:

- squeeze: ``GlobalAveragePool``, or ``ReduceMean`` over axes 2,3 (axes as attribute below opset 18, as a
  constant input from 18), keepdims 1, or keepdims 0 followed by Reshape/Unsqueeze back to N×C×1×1;
- FCs: 1×1 ``Conv`` (with or without bias) on N×C×1×1, or ``Flatten``/``Reshape``/``Squeeze`` to N×C followed by
  ``Gemm`` or ``MatMul`` (+ ``Add`` bias), with a Reshape/Unsqueeze to N×C×1×1 before or after the gate;
- ``Relu`` between the FCs;
- gate: ``Sigmoid``, ``HardSigmoid``, or its decomposed form ``Div(Clip(Add(z, 3), 0, 6), 6)`` /
  ``Mul(…, 1/6)``;
- scale: ``Mul(x, g)`` or ``Mul(g, x)``.

Matching walks backwards from each gate (a graph without any gate, such as plain ResNet, yields no candidate
at all). Each stage returns an onnxscript :class:`~onnxscript.rewriter.MatchResult`; a failed stage says *why*
(``MatchResult.fail(reason)``), and that reason is what :func:`sedeploy.passes.find_se_blocks` reports for a
refused candidate. Refusals that protect correctness: the gate must scale the very tensor that was squeezed;
weights must be constants used by this block only (rewriting a shared weight would change other nodes); no
intermediate tensor may be used outside the block (it would disappear); the squeeze must average exactly H,W.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

DEFAULT_DOMAINS = ("", "ai.onnx")
#: Reshape/Unsqueeze that turn an N×C vector back into N×C×1×1 (or leave N×C×1×1 as it is).
UNFLATTEN_OPS = ("Reshape", "Unsqueeze")


@dataclass
class Gate:
    nodes: list  # in data-flow order
    z: ir.Value  # the gate's input (excitation logits)
    out: ir.Value
    kind: str  # "Sigmoid" | "HardSigmoid"
    alpha: float = 0.2
    beta: float = 0.5
    spelling: str = "Sigmoid"  # how the source graph wrote it


@dataclass
class FC:
    nodes: list
    inp: ir.Value
    weight: np.ndarray  # [out, in]
    bias: np.ndarray | None
    kind: str  # "Conv" | "Gemm" | "MatMul"
    params: list = field(default_factory=list)  # the constant values read (weights, biases)


@dataclass
class SEMatch:
    """A fully matched SE block: everything the rewrite needs, nothing it must look up again."""

    x: ir.Value
    mul: ir.Node
    gate: Gate
    fc1: FC
    fc2: FC
    squeeze_nodes: list
    squeeze_op: str
    keepdims: int
    block_nodes: list  # every node replaced by the rewrite, the scale Mul last
    aux_values: list  # constants the old block read (removed when nothing else uses them)
    x_first: bool  # Mul(x, g) rather than Mul(g, x)


def is_op(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in ops


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is a true constant (initializer or Constant node), else None.

    An initializer that is also a graph input is *not* constant: a caller may feed another tensor at run time.
    """
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if is_op(producer, "Constant"):
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    return None


def _describe(value: ir.Value) -> str:
    p = value.producer()
    if p is None:
        return f"'{value.name}' (a graph input)" if value.is_graph_input() else f"'{value.name}'"
    return f"'{value.name}' (output of {p.op_type} '{p.name}')"


def _weight(value: ir.Value, node: ir.Node, what: str) -> tuple[np.ndarray | None, MatchResult | None]:
    """A constant weight used by ``node`` only, or the reason it cannot be fused."""
    arr = const_array(value)
    if arr is None:
        origin = "a graph input" if value.is_graph_input() else (
            f"computed by {value.producer().op_type} '{value.producer().name}'" if value.producer() else "unknown")
        return None, MatchResult().fail(f"{what} '{value.name}' of {node.op_type} '{node.name}' is not a constant "
                                        f"({origin}); only constant weights can be fused", node)
    others = sorted({u.node.name or u.node.op_type for u in value.uses() if u.node is not node})
    if others:
        return None, MatchResult().fail(f"{what} '{value.name}' of {node.op_type} '{node.name}' is shared with "
                                        f"node(s) outside the block: {', '.join(others)}", node)
    return arr.astype(np.float32), None


# ---------------------------------------------------------------------------------------------------- gate


def match_gate(node: ir.Node) -> Gate | None:
    """The gate that ends at ``node``, or None if ``node`` is no gate (not a candidate, nothing to report)."""
    if is_op(node, "Sigmoid"):
        return Gate([node], node.inputs[0], node.outputs[0], "Sigmoid")
    if is_op(node, "HardSigmoid"):
        return Gate([node], node.inputs[0], node.outputs[0], "HardSigmoid", float(_attr(node, "alpha", 0.2)),
                    float(_attr(node, "beta", 0.5)), "HardSigmoid")
    if is_op(node, "Div", "Mul") and len(node.inputs) == 2:
        # decomposed HardSigmoid: Clip(z + 3, 0, 6) / 6  or  * (1/6)
        want = 6.0 if node.op_type == "Div" else 1.0 / 6.0
        order = [(0, 1)] if node.op_type == "Div" else [(0, 1), (1, 0)]
        for i, j in order:
            k = const_array(node.inputs[j])
            clip = node.inputs[i].producer() if node.inputs[i] is not None else None
            if k is None or k.size != 1 or not np.isclose(float(k.reshape(())), want, rtol=1e-6):
                continue
            if not is_op(clip, "Clip") or not _clip_is_0_6(clip):
                continue
            add = clip.inputs[0].producer()
            if not is_op(add, "Add"):
                continue
            for a, b in ((0, 1), (1, 0)):
                three = const_array(add.inputs[b])
                if three is not None and three.size == 1 and np.isclose(float(three.reshape(())), 3.0):
                    return Gate([add, clip, node], add.inputs[a], node.outputs[0], "HardSigmoid", 1.0 / 6.0, 0.5,
                                f"Add/Clip/{node.op_type}")
    return None


def _clip_is_0_6(clip: ir.Node) -> bool:
    if len(clip.inputs) > 1:  # opset >= 11: min/max inputs
        lo = const_array(clip.inputs[1]) if clip.inputs[1] is not None else None
        hi = const_array(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2] is not None else None
        return lo is not None and hi is not None and float(lo.reshape(())) == 0.0 and float(hi.reshape(())) == 6.0
    return _attr(clip, "min") == 0.0 and _attr(clip, "max") == 6.0


# ---------------------------------------------------------------------------------------------- reshapes


def unflatten_ok(node: ir.Node, channels: int) -> MatchResult:
    """Reshape/Unsqueeze that yields N×C×1×1 from N×C (or N×C×1×1)."""
    if node.op_type == "Unsqueeze":
        axes = _attr(node, "axes") if len(node.inputs) < 2 else const_array(node.inputs[1])
        axes = None if axes is None else sorted(int(a) % 4 for a in np.asarray(axes).ravel())
        if axes != [2, 3]:
            return MatchResult().fail(f"Unsqueeze '{node.name}' inserts axes {axes}; N×C → N×C×1×1 needs axes "
                                      "[2, 3] (keepdims mismatch)", node)
        return MatchResult()
    shape = const_array(node.inputs[1])
    if shape is None:
        return MatchResult().fail(f"Reshape '{node.name}' has a computed target shape; only a constant "
                                  "N×C×1×1 target can be checked", node)
    s = [int(v) for v in shape.ravel()]
    good = len(s) == 4 and s[2:] == [1, 1] and (s[1] == channels or (s[1] == -1 and s[0] != -1))
    if not good:
        return MatchResult().fail(f"Reshape '{node.name}' targets shape {s}; the SE scale needs N×C×1×1 "
                                  f"(C = {channels}) (keepdims mismatch)", node)
    return MatchResult()


def flatten_ok(node: ir.Node, channels: int) -> MatchResult:
    """Flatten/Reshape/Squeeze that yields N×C from N×C×1×1."""
    if node.op_type == "Flatten":
        if int(_attr(node, "axis", 1)) != 1:
            return MatchResult().fail(f"Flatten '{node.name}' uses axis {_attr(node, 'axis')}, not 1", node)
        return MatchResult()
    if node.op_type == "Squeeze":
        axes = _attr(node, "axes") if len(node.inputs) < 2 else const_array(node.inputs[1])
        axes = None if axes is None else sorted(int(a) % 4 for a in np.asarray(axes).ravel())
        if axes != [2, 3]:
            return MatchResult().fail(f"Squeeze '{node.name}' removes axes {axes}, not [2, 3]", node)
        return MatchResult()
    shape = const_array(node.inputs[1])
    s = None if shape is None else [int(v) for v in shape.ravel()]
    if s is None or len(s) != 2 or not (s[1] == channels or (s[1] == -1 and s[0] != -1)):
        return MatchResult().fail(f"Reshape '{node.name}' targets shape {s}; the FC input must be N×C "
                                  f"(C = {channels})", node)
    return MatchResult()


# ------------------------------------------------------------------------------------------------- FCs


def match_fc(value: ir.Value, role: str) -> tuple[FC | None, MatchResult]:
    """The fully connected layer producing ``value``: 1×1 Conv, Gemm, or MatMul (+ Add bias)."""
    node = value.producer()
    if is_op(node, "Conv"):
        w, fail = _weight(node.inputs[1], node, f"{role} weight")
        if fail is not None:
            return None, fail
        if w.ndim != 4 or w.shape[2:] != (1, 1):
            return None, MatchResult().fail(f"{role} Conv '{node.name}' has kernel {list(w.shape[2:])}, not 1×1",
                                            node)
        for name, ok in (("group", lambda v: v == 1), ("strides", lambda v: all(s == 1 for s in v)),
                         ("dilations", lambda v: all(d == 1 for d in v)), ("pads", lambda v: not any(v)),
                         ("auto_pad", lambda v: v in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"))):
            v = _attr(node, name)
            if v is not None and not ok(v):
                return None, MatchResult().fail(f"{role} Conv '{node.name}' has {name}={v}", node)
        b, params = None, [node.inputs[1]]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b, fail = _weight(node.inputs[2], node, f"{role} bias")
            if fail is not None:
                return None, fail
            params.append(node.inputs[2])
        return FC([node], node.inputs[0], w[:, :, 0, 0], b, "Conv", params), MatchResult()
    if is_op(node, "Gemm"):
        if float(_attr(node, "alpha", 1.0)) != 1.0 or int(_attr(node, "transA", 0)) != 0:
            return None, MatchResult().fail(f"{role} Gemm '{node.name}' has alpha≠1 or transA", node)
        w, fail = _weight(node.inputs[1], node, f"{role} weight")
        if fail is not None:
            return None, fail
        w = w if int(_attr(node, "transB", 0)) else w.T
        b, params = None, [node.inputs[1]]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b, fail = _weight(node.inputs[2], node, f"{role} bias")
            if fail is not None:
                return None, fail
            b = b * float(_attr(node, "beta", 1.0))
            params.append(node.inputs[2])
        return _fc_shapes(FC([node], node.inputs[0], w, _vec(b), "Gemm", params), role, node)
    add, bias_value = None, None
    if is_op(node, "Add"):
        for i, j in ((0, 1), (1, 0)):
            mm = node.inputs[i].producer()
            if is_op(mm, "MatMul") and const_array(node.inputs[j]) is not None:
                add, bias_value, node = node, node.inputs[j], mm
                break
    if is_op(node, "MatMul"):
        w, fail = _weight(node.inputs[1], node, f"{role} weight")
        if fail is not None:
            return None, fail
        if w.ndim != 2:
            return None, MatchResult().fail(f"{role} MatMul '{node.name}' weight is {w.ndim}-D, not 2-D", node)
        nodes, params, b = [node], [node.inputs[1]], None
        if add is not None:
            b, fail = _weight(bias_value, add, f"{role} bias")
            if fail is not None:
                return None, fail
            nodes.append(add)
            params.append(bias_value)
        return _fc_shapes(FC(nodes, node.inputs[0], w.T, _vec(b), "MatMul", params), role, node)
    got = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
    return None, MatchResult().fail(f"{role} input {_describe(value)} comes from {got}, not a 1×1 Conv / Gemm / "
                                    "MatMul fully connected layer", node or value)


def _vec(b: np.ndarray | None) -> np.ndarray | None:
    return None if b is None else b.reshape(-1) if b.ndim <= 1 or b.shape[0] == 1 else b


def _fc_shapes(fc: FC, role: str, node: ir.Node) -> tuple[FC | None, MatchResult]:
    if fc.bias is not None and (fc.bias.ndim != 1 or fc.bias.shape[0] != fc.weight.shape[0]):
        return None, MatchResult().fail(f"{role} bias of '{node.name}' has shape {list(fc.bias.shape)}, not "
                                        f"[{fc.weight.shape[0]}] (per output channel)", node)
    return fc, MatchResult()


# -------------------------------------------------------------------------------------------- squeeze


def match_squeeze(value: ir.Value) -> tuple[tuple | None, MatchResult]:
    """(node, x, keepdims) for a global average over H,W producing ``value``."""
    node = value.producer()
    if is_op(node, "GlobalAveragePool"):
        rank = _rank(node.inputs[0])
        if rank not in (None, 4):
            return None, MatchResult().fail(f"GlobalAveragePool '{node.name}' input has rank {rank}, not 4", node)
        return (node, node.inputs[0], 1), MatchResult()
    if is_op(node, "ReduceMean"):
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = const_array(node.inputs[1])
            if axes is None:
                return None, MatchResult().fail(f"ReduceMean '{node.name}' has computed axes", node)
        else:
            axes = _attr(node, "axes")
        x = node.inputs[0]
        rank = _rank(x)
        if axes is None or np.asarray(axes).size == 0:
            return None, MatchResult().fail(f"ReduceMean '{node.name}' reduces over all axes; an SE squeeze "
                                            "averages over H,W only (axes 2,3)", node)
        raw = [int(a) for a in np.asarray(axes).ravel()]
        if rank is None and any(a < 0 for a in raw):
            return None, MatchResult().fail(f"ReduceMean '{node.name}' uses negative axes {raw} on a tensor of "
                                            "unknown rank", node)
        norm = sorted(a % (rank or 4) for a in raw)
        if norm != [2, 3] or rank not in (None, 4):
            return None, MatchResult().fail(f"ReduceMean '{node.name}' reduces axes {raw} of a rank-{rank} tensor; "
                                            "an SE squeeze averages over H,W (axes 2,3 of N×C×H×W)", node)
        return (node, x, int(_attr(node, "keepdims", 1))), MatchResult()
    got = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
    return None, MatchResult().fail(f"the first FC reads {_describe(value)} from {got}, not a GlobalAveragePool / "
                                    "ReduceMean squeeze", node or value)


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


# ------------------------------------------------------------------------------------------- the block


def match_block(gate_node: ir.Node) -> tuple[SEMatch | None, MatchResult]:
    """Match a whole SE block ending at ``gate_node`` (already known to be a gate), or say why not."""
    gate = match_gate(gate_node)
    if gate is None:
        return None, MatchResult().fail(f"{gate_node.op_type} '{gate_node.name}' is not an SE gate", gate_node)
    # gate output → optional Reshape/Unsqueeze → the scale Mul
    g = gate.out
    post = [u.node for u in g.uses()]
    unflatten_post = None
    if len(post) == 1 and is_op(post[0], *UNFLATTEN_OPS) and not g.is_graph_output():
        unflatten_post = post[0]
        g = unflatten_post.outputs[0]
        post = [u.node for u in g.uses()]
    if g.is_graph_output() or len(post) != 1 or not is_op(post[0], "Mul"):
        used = ", ".join(f"{n.op_type} '{n.name}'" for n in post) or "nothing"
        extra = " and is a graph output" if g.is_graph_output() else ""
        return None, MatchResult().fail(f"the gate output '{g.name}' is used by {used}{extra}; an SE gate feeds "
                                        "exactly one Mul that scales the squeezed tensor", gate_node)
    mul = post[0]
    # gate input ← optional Reshape/Unsqueeze ← FC2
    z = gate.z
    unflatten_pre = z.producer() if is_op(z.producer(), *UNFLATTEN_OPS) else None
    if unflatten_pre is not None:
        z = unflatten_pre.inputs[0]
    fc2, res = match_fc(z, "second FC")
    if fc2 is None:
        return None, res
    relu = fc2.inp.producer()
    if not is_op(relu, "Relu"):
        got = "a graph input" if relu is None else f"{relu.op_type} '{relu.name}'"
        return None, MatchResult().fail(f"the second FC reads {_describe(fc2.inp)} from {got}, not a Relu",
                                        relu or fc2.inp)
    fc1, res = match_fc(relu.inputs[0], "first FC")
    if fc1 is None:
        return None, res
    channels, squeezed = fc1.weight.shape[1], fc1.weight.shape[0]
    if fc2.weight.shape != (channels, squeezed):
        return None, MatchResult().fail(f"FC shapes do not chain: first FC {channels}→{squeezed}, second FC "
                                        f"{fc2.weight.shape[1]}→{fc2.weight.shape[0]}", fc2.nodes[0])
    # FC1 input ← [Flatten | Reshape/Unsqueeze] ← squeeze
    between, v = [], fc1.inp
    p = v.producer()
    if fc1.kind == "Conv":
        if is_op(p, *UNFLATTEN_OPS):
            between, v = [p], p.inputs[0]
    elif is_op(p, "Flatten", "Reshape", "Squeeze"):
        between, v = [p], p.inputs[0]
    sq, res = match_squeeze(v)
    if sq is None:
        return None, res
    sq_node, x, keepdims = sq
    for node in between:
        res = unflatten_ok(node, channels) if fc1.kind == "Conv" else flatten_ok(node, channels)
        if not res:
            return None, res
    if fc1.kind == "Conv" and keepdims == 0 and not between:
        return None, MatchResult().fail(f"keepdims mismatch: {sq_node.op_type} '{sq_node.name}' has keepdims=0 "
                                        f"(N×C) but feeds 1×1 Conv '{fc1.nodes[0].name}', which needs N×C×1×1",
                                        sq_node)
    if fc1.kind != "Conv" and keepdims == 1 and not between:
        return None, MatchResult().fail(f"keepdims mismatch: {sq_node.op_type} '{sq_node.name}' keeps N×C×1×1 "
                                        f"but feeds {fc1.kind} '{fc1.nodes[0].name}' without a Flatten/Reshape "
                                        "to N×C", sq_node)
    # gate side: the gate's vector must arrive at the Mul as N×C×1×1
    unflattens = [n for n in (unflatten_pre, unflatten_post) if n is not None]
    if fc2.kind != "Conv" and not unflattens:
        return None, MatchResult().fail(f"the {fc2.kind} gate vector (N×C) reaches Mul '{mul.name}' without a "
                                        "Reshape/Unsqueeze to N×C×1×1: it would broadcast over W, not scale "
                                        "channels", mul)
    for node in unflattens:
        res = unflatten_ok(node, channels)
        if not res:
            return None, res
    # the scale must multiply the very tensor that was squeezed
    other = mul.inputs[1] if mul.inputs[0] is g else mul.inputs[0]
    if other is not x:
        return None, MatchResult().fail(f"the gate scales {_describe(other)} but the squeeze averages "
                                        f"{_describe(x)}: not an SE block (the gate must feed back into the same "
                                        "tensor)", mul)
    x_shape = x.shape
    if x_shape is not None and len(x_shape) == 4 and isinstance(x_shape[1], int) and x_shape[1] != channels:
        return None, MatchResult().fail(f"the squeezed tensor has {x_shape[1]} channels but the first FC expects "
                                        f"{channels}", fc1.nodes[0])
    block = [sq_node, *between, *fc1.nodes, relu, *fc2.nodes]
    block += ([unflatten_pre] if unflatten_pre else []) + gate.nodes + ([unflatten_post] if unflatten_post else [])
    inside = set(map(id, block)) | {id(mul)}
    for node in block:
        for out in node.outputs:
            outside = [u.node for u in out.uses() if id(u.node) not in inside]
            if outside or out.is_graph_output():
                who = ", ".join(f"{n.op_type} '{n.name}'" for n in outside) or "the graph outputs"
                return None, MatchResult().fail(f"intermediate '{out.name}' ({node.op_type} '{node.name}') is also "
                                                f"consumed outside the block by {who}; fusing would remove it", node)
    aux = [v for n in block for v in n.inputs if v is not None and v is not x and const_array(v) is not None]
    return SEMatch(x=x, mul=mul, gate=gate, fc1=fc1, fc2=fc2, squeeze_nodes=[sq_node, *between],
                   squeeze_op=sq_node.op_type, keepdims=keepdims, block_nodes=[*block, mul], aux_values=aux,
                   x_first=mul.inputs[0] is x), MatchResult()
