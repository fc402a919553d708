"""The squeeze of a Squeeze-and-Excitation block (a global mean over H,W) and the reshapes between N×C×H×W, N×C
and N×C×1×1 around its FCs, each with a reason when refused (the spellings: :mod:`sedeploy.passes.se_patterns`)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from sedeploy.passes.se_parts import attr_value, const_array, describe, is_op

#: Reshape/Unsqueeze that turn an N×C vector back into N×C×1×1 (or leave N×C×1×1 as it is).
UNFLATTEN_OPS = ("Reshape", "Unsqueeze")


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
            axes = attr_value(node, "axes") if len(node.inputs) < 2 else const_array(node.inputs[1])
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
        if int(attr_value(node, "axis", 1)) != 1:
            return MatchResult().fail(f"Flatten '{node.name}' uses axis {attr_value(node, 'axis')}, not 1", node)
        return MatchResult()
    if node.op_type == "Squeeze":
        axes = attr_value(node, "axes") if len(node.inputs) < 2 else const_array(node.inputs[1])
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
            axes = attr_value(node, "axes")
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
        return (node, x, int(attr_value(node, "keepdims", 1))), MatchResult()
    if is_op(node, "AveragePool"):
        return _average_pool_squeeze(node)
    got = "a graph input" if node is None else f"{node.op_type} '{node.name}'"
    return None, MatchResult().fail(f"the first FC reads {describe(value)} from {got}, not a GlobalAveragePool / "
                                    "ReduceMean / whole-map AveragePool squeeze", node or value)


def _average_pool_squeeze(node: ir.Node) -> tuple[tuple | None, MatchResult]:
    """An AveragePool whose kernel is the whole H×W map: a global mean at this input size."""
    x = node.inputs[0]
    shape = x.shape
    hw = None if shape is None or len(shape) != 4 else [shape[2], shape[3]]
    if hw is None or not all(isinstance(d, int) for d in hw):
        return None, MatchResult().fail(f"AveragePool '{node.name}' reads a map of unknown size ({describe(x)}); "
                                        "only a kernel known to cover the whole H×W map is a global mean", node)
    kernel = [int(k) for k in attr_value(node, "kernel_shape", [])]
    pads = [int(p) for p in (attr_value(node, "pads") or [])]
    auto_pad = attr_value(node, "auto_pad", "NOTSET")
    dilations = [int(d) for d in (attr_value(node, "dilations") or [])]
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
