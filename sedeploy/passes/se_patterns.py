"""Recognising Squeeze-and-Excitation blocks in an ONNX graph (onnx-ir), with a reason for every non-match.

An SE block computes ``y = x * gate(FC2(relu(FC1(mean_HW(x)))))``. Exporters and hand-written models spell the
same arithmetic in many ways, and every stage below accepts the spellings met in practice:

- squeeze: ``GlobalAveragePool``; ``ReduceMean`` over axes 2,3 (axes as attribute below opset 18, as a
  constant input from 18), keepdims 1, or keepdims 0 followed by Reshape/Unsqueeze back to N×C×1×1; or
  ``AveragePool`` whose kernel covers the whole H×W map (no padding; H,W from shape inference — a map of unknown
  size is refused, since the same node on a larger input would no longer be a global mean);
- FCs: 1×1 ``Conv`` (with or without bias) on N×C×1×1, or ``Flatten``/``Reshape``/``Squeeze`` to N×C followed by
  ``Gemm`` or ``MatMul`` (+ ``Add`` bias), with a chain of Reshape/Unsqueeze to N×C×1×1 before or after the gate
  (``unsqueeze(-1).unsqueeze(-1)`` is two nodes);
- ``Relu`` between the FCs, or ReLU6 written as ``Clip(0, 6)`` (min/max as inputs from opset 11, attributes
  before; kept as ReLU6 in the fused form);
- gate: ``Sigmoid``, ``HardSigmoid`` (any alpha/beta), or its decomposed forms ``Div(Clip(Add(z, 3), 0, 6),
  6)`` / ``Mul(…, 1/6)`` and ``Clip(Add(Mul(z, alpha), beta), 0, 1)`` (constants compared with a float
  tolerance: converters write 1/6 as 0.16666667 or 0.166667; the fused HardSigmoid uses the constants the graph
  holds);
- scale: ``Mul(x, g)`` or ``Mul(g, x)``.

Matching walks backwards from each gate (a graph without any gate, such as plain ResNet, yields no candidate
at all; a hard-swish ``x * hardsigmoid(x)``, whose gate reads the tensor it scales, is no candidate either).
Each stage returns an onnxscript :class:`~onnxscript.rewriter.MatchResult`; a failed stage says *why*
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
    act: str = "Relu"  # between the FCs: "Relu" or "Relu6" (Clip(0, 6))


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
    if is_clip(node, 0.0, 1.0):  # HardSigmoid written out: Clip(z * alpha + beta, 0, 1), any alpha/beta
        gate = _affine_clip_gate(node)
        if gate is not None:
            return gate
    if is_op(node, "Div", "Mul") and len(node.inputs) == 2:
        # decomposed HardSigmoid: Clip(z + 3, 0, 6) / 6  or  * (1/6)
        want = 6.0 if node.op_type == "Div" else 1.0 / 6.0
        order = [(0, 1)] if node.op_type == "Div" else [(0, 1), (1, 0)]
        for i, j in order:
            k = _scalar(node.inputs[j])
            clip = node.inputs[i].producer() if node.inputs[i] is not None else None
            if k is None or not _close(k, want) or not is_clip(clip, 0.0, 6.0):
                continue
            add = clip.inputs[0].producer()
            if not is_op(add, "Add"):
                continue
            for a, b in ((0, 1), (1, 0)):
                three = _scalar(add.inputs[b])
                if three is not None and _close(three, 3.0):
                    scale = k if node.op_type == "Mul" else 1.0 / k  # the graph's own constants, not 1/6 and 3
                    return Gate([add, clip, node], add.inputs[a], node.outputs[0], "HardSigmoid", scale,
                                three * scale, f"Add/Clip/{node.op_type}")
    return None


def _affine_clip_gate(clip: ir.Node) -> Gate | None:
    """``Clip(Add(Mul(z, alpha), beta), 0, 1)`` (either operand order of Mul and Add; Div by 1/alpha too) as a
    HardSigmoid(alpha, beta) gate."""
    add = clip.inputs[0].producer() if clip.inputs[0] is not None else None
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return None
    for a, b in ((0, 1), (1, 0)):
        beta = _scalar(add.inputs[b])
        scale = add.inputs[a].producer() if add.inputs[a] is not None else None
        if beta is None or not is_op(scale, "Mul", "Div") or len(scale.inputs) != 2:
            continue
        for i, j in ((0, 1), (1, 0)) if scale.op_type == "Mul" else ((0, 1),):
            k = _scalar(scale.inputs[j])
            if k is None or k == 0.0:
                continue
            alpha = k if scale.op_type == "Mul" else 1.0 / k
            return Gate([scale, add, clip], scale.inputs[i], clip.outputs[0], "HardSigmoid", alpha, beta,
                        f"{scale.op_type}/Add/Clip")
    return None


#: relative tolerance for the constants of a decomposed HardSigmoid / ReLU6: float32 1/6 is 0.16666667 (3e-8 off),
#: a six-digit decimal 0.166667 is 2e-6 off; anything further is another function and is not matched.
CONST_RTOL = 1e-5


def _close(value: float, want: float) -> bool:
    return bool(np.isclose(value, want, rtol=CONST_RTOL, atol=0.0))


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    return None if arr is None or arr.size != 1 else float(arr.reshape(()))


def is_clip(node: ir.Node | None, lo: float, hi: float) -> bool:
    """A Clip to [lo, hi]: bounds as constant inputs (opset ≥ 11) or attributes (opset < 11)."""
    if not is_op(node, "Clip"):
        return False
    if len(node.inputs) > 1:
        lo_v = _scalar(node.inputs[1]) if node.inputs[1] is not None else None
        hi_v = _scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    else:
        lo_v, hi_v = _attr(node, "min"), _attr(node, "max")
    return lo_v is not None and hi_v is not None and _close(float(lo_v), lo) and _close(float(hi_v), hi)


def is_hard_swish(gate: Gate, scale: ir.Node) -> bool:
    """``x * hardsigmoid(x)`` (hard-swish): the gate reads the very tensor the Mul scales — an activation, not SE."""
    return gate.z in scale.inputs


# ---------------------------------------------------------------------------------------------- reshapes


def unflatten_ok(node: ir.Node, channels: int) -> MatchResult:
    """Reshape/Unsqueeze that yields N×C×1×1 from N×C (or leaves N×C×1×1 as it is)."""
    return unflatten_chain_ok([node], channels)


def unflatten_chain_ok(nodes: list, channels: int) -> MatchResult:
    """A chain of Reshape/Unsqueeze (data-flow order) that turns N×C into N×C×1×1, e.g. ``unsqueeze(-1)`` twice.

    Unsqueezes are followed on the rank (N×C → N×C×1 → N×C×1×1; negative axes count from the output's rank); a
    Reshape must target N×C×1×1 itself with a constant shape (``[-1, C, 1, 1]``, ``[N, C, 1, 1]`` or ``[N, -1, 1,
    1]``: a literal batch is fine, the fused form has none).
    """
    dims: list = ["N", "C"]  # what each step yields; "C" = the channels, 1 = a unit axis
    for node in nodes:
        if node.op_type == "Unsqueeze":
            axes = _attr(node, "axes") if len(node.inputs) < 2 else const_array(node.inputs[1])
            if axes is None:
                return MatchResult().fail(f"Unsqueeze '{node.name}' has computed axes", node)
            raw = [int(a) for a in np.asarray(axes).ravel()]
            rank = len(dims) + len(raw)
            norm = sorted(a % rank for a in raw)
            if len(set(norm)) != len(norm):
                return MatchResult().fail(f"Unsqueeze '{node.name}' repeats axes {raw}", node)
            out, it = [], iter(dims)
            for i in range(rank):
                out.append(1 if i in norm else next(it))
            dims = out
            if dims[:2] != ["N", "C"] or rank > 4:
                return MatchResult().fail(f"Unsqueeze '{node.name}' inserts axes {sorted(norm)}; N×C → N×C×1×1 "
                                          "needs axes [2, 3] (keepdims mismatch)", node)
            continue
        shape = const_array(node.inputs[1])
        if shape is None:
            return MatchResult().fail(f"Reshape '{node.name}' has a computed target shape; only a constant "
                                      "N×C×1×1 target can be checked", node)
        t = [int(v) for v in shape.ravel()]
        good = len(t) == 4 and t[2:] == [1, 1] and (t[1] == channels or (t[1] == -1 and t[0] != -1))
        if not good:
            return MatchResult().fail(f"Reshape '{node.name}' targets shape {t}; the SE scale needs N×C×1×1 "
                                      f"(C = {channels}) (keepdims mismatch)", node)
        dims = ["N", "C", 1, 1]
    if dims != ["N", "C", 1, 1]:
        return MatchResult().fail(f"{' → '.join(n.op_type for n in nodes)} yields rank {len(dims)}, not "
                                  "N×C×1×1", nodes[-1])
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
    if is_op(node, "AveragePool"):
        return _average_pool_squeeze(node)
    got = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
    return None, MatchResult().fail(f"the first FC reads {_describe(value)} from {got}, not a GlobalAveragePool / "
                                    "ReduceMean / whole-map AveragePool squeeze", node or value)


def _average_pool_squeeze(node: ir.Node) -> tuple[tuple | None, MatchResult]:
    """An AveragePool whose kernel is the whole H×W map: a global mean at this input size."""
    x = node.inputs[0]
    shape = x.shape
    hw = None if shape is None or len(shape) != 4 else [shape[2], shape[3]]
    if hw is None or not all(isinstance(d, int) for d in hw):
        return None, MatchResult().fail(f"AveragePool '{node.name}' reads a map of unknown size ({_describe(x)}); "
                                        "only a kernel known to cover the whole H×W map is a global mean", node)
    kernel = [int(k) for k in _attr(node, "kernel_shape", [])]
    pads = [int(p) for p in (_attr(node, "pads") or [])]
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    dilations = [int(d) for d in (_attr(node, "dilations") or [])]
    if kernel != hw:
        return None, MatchResult().fail(f"AveragePool '{node.name}' has kernel {kernel} on a {hw[0]}×{hw[1]} map; "
                                        "an SE squeeze averages the whole map", node)
    if any(pads) or auto_pad not in ("NOTSET", "VALID") or any(d != 1 for d in dilations):
        return None, MatchResult().fail(f"AveragePool '{node.name}' pads or dilates (pads={pads}, "
                                        f"auto_pad={auto_pad}, dilations={dilations}); not a plain global mean",
                                        node)
    return (node, x, 1), MatchResult()


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


# ------------------------------------------------------------------------------------------- the block


def _chain_after(value: ir.Value) -> tuple[list, ir.Value]:
    """Single-use Reshape/Unsqueeze nodes that follow ``value`` (in order) and the value they end with."""
    chain = []
    while not value.is_graph_output():
        uses = [u.node for u in value.uses()]
        if len(uses) != 1 or not is_op(uses[0], *UNFLATTEN_OPS) or uses[0].inputs[0] is not value:
            break
        chain.append(uses[0])
        value = uses[0].outputs[0]
    return chain, value


def _chain_before(value: ir.Value) -> tuple[list, ir.Value]:
    """Reshape/Unsqueeze nodes that produce ``value`` (in data-flow order) and the value they start from."""
    chain = []
    while is_op(value.producer(), *UNFLATTEN_OPS):
        chain.insert(0, value.producer())
        value = value.producer().inputs[0]
    return chain, value


def match_activation(value: ir.Value) -> tuple[ir.Node | None, str]:
    """The Relu or ReLU6 (Clip(0, 6)) producing ``value``, with its kind."""
    node = value.producer()
    if is_op(node, "Relu"):
        return node, "Relu"
    if is_clip(node, 0.0, 6.0):
        return node, "Relu6"
    return None, ""


def match_block(gate_node: ir.Node) -> tuple[SEMatch | None, MatchResult]:
    """Match a whole SE block ending at ``gate_node`` (already known to be a gate), or say why not."""
    gate = match_gate(gate_node)
    if gate is None:
        return None, MatchResult().fail(f"{gate_node.op_type} '{gate_node.name}' is not an SE gate", gate_node)
    # gate output → optional Reshape/Unsqueeze chain → the scale Mul
    unflatten_post, g = _chain_after(gate.out)
    post = [u.node for u in g.uses()]
    if g.is_graph_output() or len(post) != 1 or not is_op(post[0], "Mul"):
        used = ", ".join(f"{n.op_type} '{n.name}'" for n in post) or "nothing"
        extra = " and is a graph output" if g.is_graph_output() else ""
        return None, MatchResult().fail(f"the gate output '{g.name}' is used by {used}{extra}; an SE gate feeds "
                                        "exactly one Mul that scales the squeezed tensor", gate_node)
    mul = post[0]
    # gate input ← optional Reshape/Unsqueeze chain ← FC2
    unflatten_pre, z = _chain_before(gate.z)
    fc2, res = match_fc(z, "second FC")
    if fc2 is None:
        return None, res
    relu, act = match_activation(fc2.inp)
    if relu is None:
        p = fc2.inp.producer()
        got = "a graph input" if p is None else f"{p.op_type} '{p.name}'"
        return None, MatchResult().fail(f"the second FC reads {_describe(fc2.inp)} from {got}, not a Relu or a "
                                        "ReLU6 (Clip(0, 6))", p or fc2.inp)
    fc1, res = match_fc(relu.inputs[0], "first FC")
    if fc1 is None:
        return None, res
    channels, squeezed = fc1.weight.shape[1], fc1.weight.shape[0]
    if fc2.weight.shape != (channels, squeezed):
        return None, MatchResult().fail(f"FC shapes do not chain: first FC {channels}→{squeezed}, second FC "
                                        f"{fc2.weight.shape[1]}→{fc2.weight.shape[0]}", fc2.nodes[0])
    # FC1 input ← [Flatten | Reshape/Unsqueeze chain] ← squeeze
    between, v = [], fc1.inp
    p = v.producer()
    if fc1.kind == "Conv":
        between, v = _chain_before(v)
    elif is_op(p, "Flatten", "Reshape", "Squeeze"):
        between, v = [p], p.inputs[0]
    sq, res = match_squeeze(v)
    if sq is None:
        return None, res
    sq_node, x, keepdims = sq
    if between:
        res = unflatten_chain_ok(between, channels) if fc1.kind == "Conv" else flatten_ok(between[0], channels)
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
    unflattens = unflatten_pre + unflatten_post
    if fc2.kind != "Conv" and not unflattens:
        return None, MatchResult().fail(f"the {fc2.kind} gate vector (N×C) reaches Mul '{mul.name}' without a "
                                        "Reshape/Unsqueeze to N×C×1×1: it would broadcast over W, not scale "
                                        "channels", mul)
    if unflattens:
        if fc2.kind == "Conv":  # already N×C×1×1: only shape-preserving reshapes are allowed
            res = MatchResult()
            for node in unflattens:
                res = unflatten_ok(node, channels) if node.op_type == "Reshape" else MatchResult().fail(
                    f"Unsqueeze '{node.name}' on the N×C×1×1 gate of 1×1 Conv FCs changes its rank", node)
                if not res:
                    break
        else:
            res = unflatten_chain_ok(unflattens, channels)
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
    block = [sq_node, *between, *fc1.nodes, relu, *fc2.nodes, *unflatten_pre, *gate.nodes, *unflatten_post]
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
                   x_first=mul.inputs[0] is x, act=act), MatchResult()
