"""Spell every global average over H,W as ``GlobalAveragePool``.

Exporters write the mean over H,W as ``ReduceMean(axes=[2, 3], keepdims=1)`` (the dynamo exporter does for the
classifier's pool). It computes the same values as ``GlobalAveragePool``, but only the latter has an ONNX Runtime
QLinear kernel (``QLinearGlobalAveragePool``), so the INT8 CPU form rewrites it to keep activations uint8 up to the
classifier. SE squeezes are already GlobalAveragePool after the SE fusion pass; this pass covers the rest.
"""
from __future__ import annotations

from sedeploy.onnxcore import Graph, attr


def reduce_mean_to_global_pool(model) -> int:
    """Rewrite, in place, each ``ReduceMean`` over axes (2, 3) with keepdims=1 on a 4-D tensor to
    ``GlobalAveragePool`` (same output name, same values). Returns how many nodes were rewritten."""
    g = Graph(model)
    changed = 0
    for n in model.graph.node:
        if n.op_type != "ReduceMean" or n.domain not in ("", "ai.onnx"):
            continue
        axes = attr(n, "axes")
        if axes is None and len(n.input) > 1 and n.input[1]:
            const = g.const(n.input[1])
            axes = None if const is None else const.ravel().tolist()
        if attr(n, "keepdims", 1) != 1 or axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        changed += 1
    return changed
