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
The gate, the activation and the FCs are matched in :mod:`sedeploy.passes.se_parts`, the squeeze and the
reshapes in :mod:`sedeploy.passes.se_squeeze`; this module matches the whole block. Each stage returns an
onnxscript :class:`~onnxscript.rewriter.MatchResult`; a failed stage says *why* (``MatchResult.fail(reason)``),
and that reason is what :func:`sedeploy.passes.find_se_blocks` reports for a refused candidate. Refusals that
protect correctness: the gate must scale the very tensor that was squeezed; weights must be constants used by this
block only (rewriting a shared weight would change other nodes); no intermediate tensor may be used outside the
block (it would disappear); the squeeze must average exactly H,W.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from sedeploy.passes.se_parts import FC, Gate, const_array, describe, is_op, match_activation, match_fc, match_gate
from sedeploy.passes.se_squeeze import UNFLATTEN_OPS, flatten_ok, match_squeeze, unflatten_chain_ok, unflatten_ok


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
        return None, MatchResult().fail(f"the second FC reads {describe(fc2.inp)} from {got}, not a Relu or a "
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
        return None, MatchResult().fail(f"the gate scales {describe(other)} but the squeeze averages "
                                        f"{describe(x)}: not an SE block (the gate must feed back into the same "
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
