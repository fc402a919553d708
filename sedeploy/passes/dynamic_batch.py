"""Make a fixed-batch classifier's batch dimension dynamic — only when that is provably safe.

Converters often export at a fixed batch of 1. Such a model runs anywhere at that batch (sedeploy chunks larger
batches), but batching is where CPU and GPU throughput come from. Renaming the batch dimension to ``N`` is only
correct when nothing in the graph depends on the old batch value, so :func:`make_batch_dynamic` proves it in two
steps and refuses with the reason otherwise:

1. Structure: every tensor keeps the batch on axis 0 and no constant encodes it. Refused: ``Reshape`` whose
   constant target has a literal batch other than ``0``/``-1`` in position 0 (a ``[1, C, 1, 1]`` written by a
   converter; ``[-1, …]`` and ``[0, …]`` follow the input) or a computed target; ``Expand``, ``Tile``,
   ``ConstantOfShape``, ``Shape`` (except the batch read for a ``Reshape`` target as torch exports
   ``x.view(x.size(0), -1)``, see :func:`batch_generic_target`), ``Size``, ``Range``, ``Resize``/``Upsample`` with sizes — shape arithmetic the
   check cannot follow; ops that move or index axis 0 (``Transpose`` with perm[0] ≠ 0, ``Flatten``/``Softmax``-family
   with axis 0, ``Concat``/``Split``/``Gather``/``Slice`` on axis 0, ``Squeeze``/``Unsqueeze``/reductions of
   axis 0); any op outside a list of per-sample ops.
2. Numbers: the dynamic model on a batch of 3 equals the fixed model run image by image (max |Δ| ≤ 1e-5 of the
   output's scale).
"""
from __future__ import annotations

import numpy as np

from sedeploy.onnxcore import Graph, attr, image_input, run_model
from sedeploy.preprocess import smooth_noise

#: ops that compute each sample independently (for the attribute checks below)
_PER_SAMPLE = {"Conv", "ConvTranspose", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Add", "Sub",
               "Div", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Gemm",
               "MatMul", "Flatten", "Reshape", "Softmax", "LogSoftmax", "Identity", "Dropout", "LeakyRelu", "PRelu",
               "Tanh", "Exp", "Log", "Sqrt", "Pow", "Neg", "Abs", "Max", "Min", "Concat", "Transpose", "Squeeze",
               "Unsqueeze", "ReduceMean", "ReduceMax", "ReduceSum", "Cast", "Erf", "Pad", "Constant", "Split",
               "Slice", "Gather", "LRN", "InstanceNormalization", "Elu", "Selu", "Softplus", "Mish", "Gelu"}


def _axes(node, g) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        c = g.const(node.input[1])
        axes = None if c is None else c.ravel().tolist()
    return None if axes is None else [int(a) for a in axes]


def batch_generic_target(g, target: str) -> list | None:
    """The nodes computing a Reshape ``target`` that reads the batch from the tensor itself — torch's
    ``x.view(x.size(0), -1)``: ``Concat(Unsqueeze(Gather(Shape(t), 0)), constants)`` (or a 1-D ``Gather`` index
    ``[0]`` without the Unsqueeze) — or None for any other target. Its position 0 is the running batch."""
    concat = g.producer.get(target)
    if concat is None or concat.op_type != "Concat" or int(attr(concat, "axis", 0)) != 0 or not concat.input:
        return None
    if any(g.const(i) is None for i in concat.input[1:]):
        return None
    used, head = [concat], g.producer.get(concat.input[0])
    if head is not None and head.op_type == "Unsqueeze":
        axes = _axes(head, g)
        if axes not in ([0], [-1]):
            return None
        used.append(head)
        head = g.producer.get(head.input[0])
    if head is None or head.op_type != "Gather" or int(attr(head, "axis", 0)) != 0:
        return None
    index = g.const(head.input[1])
    if index is None or index.size != 1 or int(index.ravel()[0]) != 0 or index.ndim + len(used) != 2:
        return None  # a scalar index 0 needs the Unsqueeze, an index [0] needs none
    shape = g.producer.get(head.input[0])
    if shape is None or shape.op_type != "Shape" or int(attr(shape, "start", 0)) != 0:
        return None
    return [*used, head, shape]


def batch_dependence(model) -> str | None:
    """Why renaming the batch dimension of ``model`` could change its results, or None when the structure is
    batch-agnostic (step 1 of the module docstring)."""
    g = Graph(model)
    generic: dict[int, list] = {}  # Reshape → the nodes reading its batch from Shape (checked with it)
    for n in g.nodes:
        if n.op_type == "Reshape" and len(n.input) > 1 and g.const(n.input[1]) is None:
            found = batch_generic_target(g, n.input[1])
            if found is not None:
                generic[id(n)] = found
    consumers: dict[str, list] = {}
    for n in g.nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    exempt = {id(m) for nodes in generic.values() for m in nodes
              if all(id(c) in {id(x) for x in nodes} or id(c) in generic for o in m.output
                     for c in consumers.get(o, []))}
    for n in g.nodes:
        op, who = n.op_type, f"{n.op_type} '{n.name}'"
        if id(n) in exempt:
            continue
        if id(n) in generic:
            if int(attr(n, "allowzero", 0)):
                return f"{who} has allowzero=1"
            continue
        if n.domain not in ("", "ai.onnx") or op not in _PER_SAMPLE:
            return f"{who} is not on the list of ops known to keep samples independent"
        if op == "Reshape":
            shape = g.const(n.input[1])
            if shape is None:
                return f"{who} has a computed target shape"
            if int(shape.ravel()[0]) not in (0, -1):
                return f"{who} writes the literal batch {int(shape.ravel()[0])} into its target {shape.tolist()}"
            if int(attr(n, "allowzero", 0)) and int(shape.ravel()[0]) == 0:
                return f"{who} has allowzero=1 with a 0 in the batch position"
        elif op == "Transpose":
            perm = attr(n, "perm")
            if perm is None or int(perm[0]) != 0:
                return f"{who} moves axis 0 (perm {perm})"
        elif op in ("Flatten", "Softmax", "LogSoftmax", "Concat", "Split", "Gather"):
            axis = int(attr(n, "axis", 1 if op in ("Flatten",) else (-1 if op in ("Softmax", "LogSoftmax") else 0)))
            if axis == 0:
                return f"{who} works along axis 0 (the batch)"
        elif op in ("Squeeze", "Unsqueeze", "ReduceMean", "ReduceMax", "ReduceSum", "Slice"):
            axes = _axes(n, g) if op != "Slice" else (
                None if len(n.input) < 4 or not n.input[3] or g.const(n.input[3]) is None
                else [int(a) for a in g.const(n.input[3]).ravel()])
            if axes is None and op in ("Squeeze", "Unsqueeze", "Slice"):
                return f"{who} has no constant axes"
            if axes is None or 0 in axes:
                return f"{who} touches axis 0 (axes {axes})"
    return None


def make_batch_dynamic(model, *, check_batch: int = 3, normalize=None) -> tuple[object | None, str]:
    """(copy of ``model`` with the batch dimension named ``N``, how it was proven) when safe, else (None, reason).
    ``model`` must have one input with a fixed batch (see the module docstring).

    ``normalize``: a function of a model returning the model it is checked as (e.g. its canonical form, with
    constant subgraphs folded): the renamed copy is normalized, then proven; the renamed copy is returned. Renaming
    first keeps ``Shape(input)`` symbolic, so a graph that reads the batch from its input stays batch-generic."""
    import onnx

    inp = image_input(model, path="the model")
    if not inp.static_batch:
        return None, "the batch is already dynamic"
    dyn = onnx.ModelProto()
    dyn.CopyFrom(model)
    for vi in [*dyn.graph.input, *dyn.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == inp.static_batch:
            dims[0].dim_param = "N"
    del dyn.graph.value_info[:]  # inferred shapes of the fixed model would pin the batch again
    checked = dyn if normalize is None else normalize(dyn)
    why = batch_dependence(checked)
    if why is not None:
        return None, why

    x = smooth_noise(check_batch, (inp.height, inp.width), seed=11)
    ref = run_model(model, x)  # chunked at the fixed batch
    got = run_model(checked, x)
    diff = float(np.abs(ref - got).max()) if ref.shape == got.shape else float("inf")
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:
        return None, f"the dynamic model at batch {check_batch} differs from the fixed one by {diff:.3g} (> {tol:.1g})"
    return dyn, (f"batch made dynamic: no batch-dependent Reshape/Expand constants or axis-0 ops, and batch "
                 f"{check_batch} equals {check_batch} single runs (max |Δ| {diff:.1g})")
