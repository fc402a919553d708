"""Squeeze before the expanding conv: an exact rewrite of bottleneck SE blocks for CPU FP32 engines.

In a bottleneck SE block the SE squeeze pools the output of the block's last 1×1 conv (the "expanding" conv,
BatchNorm folded in), and the first SE FC reads the pooled vector::

    t = Conv1×1(h; W3, b3)                     # C_out = 4 × C_in channels
    s = GlobalAveragePool(t)
    z = Conv1×1(s; W1, b1)                     # SE FC1, then ReLU, FC2, Sigmoid, Mul(t, gate)

A 1×1 stride-1 conv is linear in each pixel, so the spatial mean commutes with it:
``GAP(W3·h + b3) = W3·GAP(h) + b3``, and FC1 of that is ``(W1·W3)·GAP(h) + (W1·b3 + b1)``. The rewrite pools
``h`` (a quarter of the channels) and gives FC1 the folded weights, which also have a quarter of the inputs; no
node is added. Everything else — the expanding conv, FC2, the gate, the scale Mul — is unchanged.

Measured (benchmarks/results/squeeze_first/, 2-core AMD EPYC, interleaved with OpenVINO FP32 reading the
standard form): OpenVINO's FP32 engine 1.01–1.04× at batch 1 and 1.02–1.06× at batch 8 on SE-ResNet-50 (trained,
112 px; random, 224 px) and SE-ResNet-101 (random, 224 px); the squeezes' own time drops 2–3× in the INT8
profiles. ONNX Runtime gains nothing measurable (0.99–1.03×), so only OpenVINO's FP32 engines get it
(:func:`sedeploy.backends.openvino.build_engine`). It is never applied to the artifacts: the block no longer has the
SE shape the precision policies recognise (its squeeze pools another tensor than the one it scales). INT8 gains
nothing from it on OpenVINO: its low-precision transformations then leave the expanding conv's output in bf16/f32
instead of int8 (the scale Mul no longer shares that tensor with the squeeze), which at 224 px costs more than
the squeeze saves: 0.92–1.09× NNCF against 0.95–1.07× for the standard form in the same runs, no consistent gain.

Pattern / check / rewrite, as each fusion here: :func:`find_squeeze_first` lists every candidate squeeze with the
reason it does not match; :func:`squeeze_first` rewrites the matches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import Graph, attr


@dataclass
class SqueezeFirstCandidate:
    """One GlobalAveragePool the matcher looked at: matched (``reason is None``) or why not."""

    pool: str
    reason: str | None = None
    expand_conv: str | None = None
    fc1: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class SqueezeFirstReport:
    rewritten: int
    candidates: list[SqueezeFirstCandidate] = field(default_factory=list)

    @property
    def refused(self) -> list[tuple[str, str]]:
        return [(c.pool, c.reason) for c in self.candidates if not c.ok]

    def as_dict(self) -> dict:
        return {"rewritten": self.rewritten, "refused": [{"pool": p, "reason": r} for p, r in self.refused]}


def _is_plain_1x1(node, weight: np.ndarray | None) -> str | None:
    """Why ``node`` (a Conv) is not a plain 1×1 conv (stride 1, no padding, one group), or None."""
    if weight is None:
        return "its weight is not a constant"
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        return f"its kernel is {tuple(weight.shape[2:])}, not 1×1"
    if int(attr(node, "group", 1)) != 1:
        return f"it is a grouped conv (group={attr(node, 'group')})"
    if any(int(s) != 1 for s in attr(node, "strides", [1, 1])):
        return f"its strides are {list(attr(node, 'strides'))}"
    if any(int(p) != 0 for p in attr(node, "pads", [0, 0, 0, 0])):
        return f"it pads {list(attr(node, 'pads'))}"
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):  # SAME_* on a 1×1 stride-1 conv pads nothing either, but say so
        return f"auto_pad={auto_pad}"
    return None


def _conv_problem(g, node, role: str) -> str | None:
    """Why ``node`` (the expanding conv or SE FC1) cannot take part in the fold, or None."""
    name = g.name(node)
    why = _is_plain_1x1(node, g.const(node.input[1]) if len(node.input) > 1 else None)
    if why:
        return f"{role} ('{name}') is not a plain 1×1 conv: {why}"
    if len(node.input) > 2 and node.input[2] and g.const(node.input[2]) is None:
        return f"the bias of '{name}' is not a constant"
    return None


def _match(g, pool, subgraph_names: set[str]) -> SqueezeFirstCandidate:
    """Check one GlobalAveragePool; the candidate says what matched or why not. ``subgraph_names``: every name
    read or written inside a subgraph (If/Loop bodies), which :class:`Graph`'s consumers do not list."""
    cand = SqueezeFirstCandidate(pool=g.name(pool))
    conv = g.made_by(pool.input[0], "Conv")  # (in a Q/DQ graph a DequantizeLinear: INT8 artifacts are left alone)
    if conv is None:
        cand.reason = "its input is not made by a Conv"
        return cand
    cand.expand_conv = g.name(conv)
    cand.reason = _conv_problem(g, conv, "the conv it pools")
    if cand.reason:
        return cand
    if pool.output[0] in g.graph_outputs:
        cand.reason = "its output is a graph output (the pooled values would change)"
        return cand
    if pool.output[0] in subgraph_names:
        cand.reason = "a subgraph (If/Loop body) reads its output (the pooled values would change)"
        return cand
    users = g.consumers.get(pool.output[0], [])
    if len(users) != 1 or users[0].op_type != "Conv" or list(users[0].input[:1]) != [pool.output[0]]:
        cand.reason = f"its output feeds {[u.op_type for u in users]}, not exactly one Conv (SE FC1)"
        return cand
    fc1 = users[0]
    cand.fc1 = g.name(fc1)
    cand.reason = _conv_problem(g, fc1, "the FC after it")
    if cand.reason:
        return cand
    w1, w3 = g.const(fc1.input[1]), g.const(conv.input[1])
    if w1.shape[1] != w3.shape[0]:
        cand.reason = f"'{cand.fc1}' reads {w1.shape[1]} channels, '{cand.expand_conv}' makes {w3.shape[0]}"
    elif w1.dtype != np.float32:
        cand.reason = f"its FC weights are {w1.dtype}, not float32 (the fold is for FP32 engines)"
    return cand


def _plan(g, graph) -> tuple[list[SqueezeFirstCandidate], list[tuple]]:
    """Every squeeze's candidate, and the (candidate, pool, conv, fc1) chosen for rewriting: a conv or FC that
    another chosen block already uses (chained blocks) is refused, first block first."""
    pools = [n for n in g.nodes if n.op_type == "GlobalAveragePool" and n.domain in ("", "ai.onnx")]
    inner = _subgraph_names(graph)
    candidates = [_match(g, n, inner) for n in pools]
    chosen, in_use = [], set()
    for pool, c in zip(pools, candidates):
        if not c.ok:
            continue
        conv, fc1 = g.producer[pool.input[0]], g.consumers[pool.output[0]][0]
        if {id(conv), id(fc1)} & in_use:
            c.reason = "its conv or FC belongs to another rewritten block"
            continue
        in_use |= {id(conv), id(fc1)}
        chosen.append((c, pool, conv, fc1))
    return candidates, chosen


def _subgraphs(graph):
    from onnx import AttributeProto

    for n in graph.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield a.g
            elif a.type == AttributeProto.GRAPHS:
                yield from a.graphs


def _subgraph_names(graph) -> set[str]:
    """Every tensor name read or written inside ``graph``'s subgraphs (at any depth)."""
    names: set[str] = set()
    for sub in _subgraphs(graph):
        names |= {i.name for i in sub.input} | {o.name for o in sub.output} | {t.name for t in sub.initializer}
        for n in sub.node:
            names.update(n.input)
            names.update(n.output)
        names |= _subgraph_names(sub)
    return names


def _names_used(graph) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads, plus the graph's inputs
    and outputs."""
    used = {i.name for i in graph.input} | {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
    for sub in _subgraphs(graph):
        used |= _names_used(sub)
    return used


def find_squeeze_first(model) -> list[SqueezeFirstCandidate]:
    """Every GlobalAveragePool of ``model`` (an onnx.ModelProto) and whether the rewrite applies to it."""
    return _plan(Graph(model), model.graph)[0]


def squeeze_first(model):
    """Rewrite ``model`` (an onnx.ModelProto, not modified) so each matched squeeze pools the expanding conv's
    input and its FC1 carries the folded weights. Returns (new onnx.ModelProto, SqueezeFirstReport).

    The folded weights are computed in float64 and stored in the FC1 weight's type; the expanding conv's output
    is still computed (the scale Mul reads it). The old FC1 weight and bias are dropped unless something else
    (another node, a subgraph, a graph input) still reads them."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        raise SedeployError(f"squeeze_first was given a {type(model).__name__}.", expected="an onnx.ModelProto",
                            fix="load the file first: sedeploy.onnxcore.load_onnx(path)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = Graph(out)
    candidates, chosen = _plan(g, out.graph)
    taken = ({i.name for i in out.graph.initializer} | set(g.producer) | g.graph_inputs | _names_used(out.graph)
             | _subgraph_names(out.graph))
    plans = []
    for c, pool, conv, fc1 in chosen:  # every fold is computed before anything changes (chained blocks)
        w3 = g.const(conv.input[1]).astype(np.float64)[:, :, 0, 0]
        w1 = g.const(fc1.input[1]).astype(np.float64)[:, :, 0, 0]
        b3, b1 = (g.const(n.input[2]).astype(np.float64) if len(n.input) > 2 and n.input[2] else np.zeros(rows)
                  for n, rows in ((conv, w3.shape[0]), (fc1, w1.shape[0])))
        plans.append((c, pool, conv, fc1, (w1 @ w3)[:, :, None, None].astype(np.float32),
                      (w1 @ b3 + b1).astype(np.float32)))
    rewritten, replaced = 0, set()
    for c, pool, conv, fc1, weight, bias in plans:
        names = []
        for role, arr in (("weight", weight), ("bias", bias)):
            base, k = f"{c.fc1}.squeeze_first.{role}", 0
            name = base
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            taken.add(name)
            out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            names.append(name)
        pool.input[0] = conv.input[0]
        replaced.update(fc1.input[1:])
        del fc1.input[1:]
        fc1.input.extend(names)
        rewritten += 1
    if rewritten:
        used = _names_used(out.graph)
        keep = [t for t in out.graph.initializer if t.name in used or t.name not in replaced]
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        # the pooled tensors changed meaning: their old shape annotations (C channels) no longer hold
        pooled = {plan[1].output[0] for plan in plans}
        vi = [v for v in out.graph.value_info if v.name not in pooled]
        del out.graph.value_info[:]
        out.graph.value_info.extend(vi)
    return out, SqueezeFirstReport(rewritten=rewritten, candidates=candidates)
