"""The parts of a Squeeze-and-Excitation block, each matched on its own: the gate, the activation between the
FCs, and the two fully connected layers (with the graph helpers every SE matcher shares).

The spellings each part accepts, and the block they make up, are described in :mod:`sedeploy.passes.se_patterns`;
the squeeze and the reshapes around the FCs are in :mod:`sedeploy.passes.se_squeeze`. A matcher returns an
onnxscript :class:`~onnxscript.rewriter.MatchResult` that says *why* when a part is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

DEFAULT_DOMAINS = ("", "ai.onnx")


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



def is_op(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in ops



def attr_value(node: ir.Node, name: str, default=None):
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


def describe(value: ir.Value) -> str:
    p = value.producer()
    if p is None:
        return f"'{value.name}' (a graph input)" if value.is_graph_input() else f"'{value.name}'"
    return f"'{value.name}' (output of {p.op_type} '{p.name}')"


def const_weight(value: ir.Value, node: ir.Node, what: str) -> tuple[np.ndarray | None, MatchResult | None]:
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
        return Gate([node], node.inputs[0], node.outputs[0], "HardSigmoid", float(attr_value(node, "alpha", 0.2)),
                    float(attr_value(node, "beta", 0.5)), "HardSigmoid")
    if is_clip(node, 0.0, 1.0):  # HardSigmoid written out: Clip(z * alpha + beta, 0, 1), any alpha/beta
        gate = _affine_clip_gate(node)
        if gate is not None:
            return gate
    if is_op(node, "Div", "Mul") and len(node.inputs) == 2:
        # decomposed HardSigmoid: Clip(z + 3, 0, 6) / 6  or  * (1/6)
        want = 6.0 if node.op_type == "Div" else 1.0 / 6.0
        order = [(0, 1)] if node.op_type == "Div" else [(0, 1), (1, 0)]
        for i, j in order:
            k = scalar(node.inputs[j])
            clip = node.inputs[i].producer() if node.inputs[i] is not None else None
            if k is None or not is_close(k, want) or not is_clip(clip, 0.0, 6.0):
                continue
            add = clip.inputs[0].producer()
            if not is_op(add, "Add"):
                continue
            for a, b in ((0, 1), (1, 0)):
                three = scalar(add.inputs[b])
                if three is not None and is_close(three, 3.0):
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
        beta = scalar(add.inputs[b])
        scale = add.inputs[a].producer() if add.inputs[a] is not None else None
        if beta is None or not is_op(scale, "Mul", "Div") or len(scale.inputs) != 2:
            continue
        for i, j in ((0, 1), (1, 0)) if scale.op_type == "Mul" else ((0, 1),):
            k = scalar(scale.inputs[j])
            if k is None or k == 0.0:
                continue
            alpha = k if scale.op_type == "Mul" else 1.0 / k
            return Gate([scale, add, clip], scale.inputs[i], clip.outputs[0], "HardSigmoid", alpha, beta,
                        f"{scale.op_type}/Add/Clip")
    return None


#: relative tolerance for the constants of a decomposed HardSigmoid / ReLU6: float32 1/6 is 0.16666667 (3e-8 off),
#: a six-digit decimal 0.166667 is 2e-6 off; anything further is another function and is not matched.
CONST_RTOL = 1e-5


def is_close(value: float, want: float) -> bool:
    return bool(np.isclose(value, want, rtol=CONST_RTOL, atol=0.0))


def scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    return None if arr is None or arr.size != 1 else float(arr.reshape(()))


def is_clip(node: ir.Node | None, lo: float, hi: float) -> bool:
    """A Clip to [lo, hi]: bounds as constant inputs (opset ≥ 11) or attributes (opset < 11)."""
    if not is_op(node, "Clip"):
        return False
    if len(node.inputs) > 1:
        lo_v = scalar(node.inputs[1]) if node.inputs[1] is not None else None
        hi_v = scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    else:
        lo_v, hi_v = attr_value(node, "min"), attr_value(node, "max")
    return lo_v is not None and hi_v is not None and is_close(float(lo_v), lo) and is_close(float(hi_v), hi)


def is_hard_swish(gate: Gate, scale: ir.Node) -> bool:
    """``x * hardsigmoid(x)`` (hard-swish): the gate reads the very tensor the Mul scales — an activation, not SE."""
    return gate.z in scale.inputs


def match_activation(value: ir.Value) -> tuple[ir.Node | None, str]:
    """The Relu or ReLU6 (Clip(0, 6)) producing ``value``, with its kind."""
    node = value.producer()
    if is_op(node, "Relu"):
        return node, "Relu"
    if is_clip(node, 0.0, 6.0):
        return node, "Relu6"
    return None, ""



# ------------------------------------------------------------------------------------------------- FCs


def match_fc(value: ir.Value, role: str) -> tuple[FC | None, MatchResult]:
    """The fully connected layer producing ``value``: 1×1 Conv, Gemm, or MatMul (+ Add bias)."""
    node = value.producer()
    if is_op(node, "Conv"):
        w, fail = const_weight(node.inputs[1], node, f"{role} weight")
        if fail is not None:
            return None, fail
        if w.ndim != 4 or w.shape[2:] != (1, 1):
            return None, MatchResult().fail(f"{role} Conv '{node.name}' has kernel {list(w.shape[2:])}, not 1×1",
                                            node)
        for name, ok in (("group", lambda v: v == 1), ("strides", lambda v: all(s == 1 for s in v)),
                         ("dilations", lambda v: all(d == 1 for d in v)), ("pads", lambda v: not any(v)),
                         ("auto_pad", lambda v: v in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"))):
            v = attr_value(node, name)
            if v is not None and not ok(v):
                return None, MatchResult().fail(f"{role} Conv '{node.name}' has {name}={v}", node)
        b, params = None, [node.inputs[1]]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b, fail = const_weight(node.inputs[2], node, f"{role} bias")
            if fail is not None:
                return None, fail
            params.append(node.inputs[2])
        return FC([node], node.inputs[0], w[:, :, 0, 0], b, "Conv", params), MatchResult()
    if is_op(node, "Gemm"):
        if float(attr_value(node, "alpha", 1.0)) != 1.0 or int(attr_value(node, "transA", 0)) != 0:
            return None, MatchResult().fail(f"{role} Gemm '{node.name}' has alpha≠1 or transA", node)
        w, fail = const_weight(node.inputs[1], node, f"{role} weight")
        if fail is not None:
            return None, fail
        w = w if int(attr_value(node, "transB", 0)) else w.T
        b, params = None, [node.inputs[1]]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b, fail = const_weight(node.inputs[2], node, f"{role} bias")
            if fail is not None:
                return None, fail
            b = b * float(attr_value(node, "beta", 1.0))
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
        w, fail = const_weight(node.inputs[1], node, f"{role} weight")
        if fail is not None:
            return None, fail
        if w.ndim != 2:
            return None, MatchResult().fail(f"{role} MatMul '{node.name}' weight is {w.ndim}-D, not 2-D", node)
        nodes, params, b = [node], [node.inputs[1]], None
        if add is not None:
            b, fail = const_weight(bias_value, add, f"{role} bias")
            if fail is not None:
                return None, fail
            nodes.append(add)
            params.append(bias_value)
        return _fc_shapes(FC(nodes, node.inputs[0], w.T, _vec(b), "MatMul", params), role, node)
    got = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
    return None, MatchResult().fail(f"{role} input {describe(value)} comes from {got}, not a 1×1 Conv / Gemm / "
                                    "MatMul fully connected layer", node or value)


def _vec(b: np.ndarray | None) -> np.ndarray | None:
    return None if b is None else b.reshape(-1) if b.ndim <= 1 or b.shape[0] == 1 else b


def _fc_shapes(fc: FC, role: str, node: ir.Node) -> tuple[FC | None, MatchResult]:
    if fc.bias is not None and (fc.bias.ndim != 1 or fc.bias.shape[0] != fc.weight.shape[0]):
        return None, MatchResult().fail(f"{role} bias of '{node.name}' has shape {list(fc.bias.shape)}, not "
                                        f"[{fc.weight.shape[0]}] (per output channel)", node)
    return fc, MatchResult()
