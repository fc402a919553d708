"""A read-only index over an ONNX graph, and the questions every module asks of one.

- :class:`Graph`: producers, consumers, constants and element types of every tensor;
- :func:`is_quantized`: does the graph compute in int8 (Q/DQ or QOperator nodes)?
- :func:`graph_precision`: "int8", "fp16" or "fp32", read from the graph itself;
- :func:`compute_depths`: longest compute path to each tensor (tells a residual Add's skip input).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from sedeploy.onnxcore.io import as_model

#: Explicit quantization nodes (what TensorRT wants).
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Quantized operators / integer forms (QOperator format) that ONNX Runtime's quantizer can emit.
QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearReduceMean", "QLinearWhere", "QAttention",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
    "QOrderedMatMul", "MatMulNBits"})
#: Nodes that move or relabel data without computing.
PASS_THROUGH_OPS = ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity")
FLOAT_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}  # TensorProto FLOAT, FLOAT16, BFLOAT16, DOUBLE
INT64, BOOL, UINT8, INT8, INT32, FLOAT, FLOAT16 = 7, 9, 2, 3, 6, 1, 10


class Graph:
    """Read-only index over an ONNX graph: producers, consumers, constants and element types of every tensor.

    Element types come from graph inputs, initializers and value_info, then are propagated in node order (Cast,
    Q/DQ and a few integer/bool-producing ops are typed exactly; other ops take their first input's type), so no
    shape inference run is needed and huge models are not copied.
    """

    def __init__(self, model):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.initializers = {t.name: t for t in g.initializer if t.name not in self.graph_inputs}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self._names = {id(n): n.name or f"<{n.op_type} #{k}>" for k, n in enumerate(self.nodes)}
        self.dtype = self._element_types()

    def name(self, node) -> str:
        return self._names[id(node)]

    def is_const(self, tensor: str) -> bool:
        return tensor in self.initializers or tensor in self.constant_nodes

    def const(self, tensor: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.constant_nodes.get(tensor)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.asarray(a.f if a.name == "value_float" else a.i)
                if a.name in ("value_floats", "value_ints"):
                    return np.asarray(list(a.floats) if a.name == "value_floats" else list(a.ints))
        return None

    def made_by(self, tensor: str, op_type: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def _element_types(self) -> dict[str, int]:
        g = self.model.graph
        types: dict[str, int] = {}
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in self.nodes:
            if not n.output or all(o in types for o in n.output if o):
                continue
            out = _output_type(n, types)
            if out:
                for o in n.output:
                    if o and o not in types:
                        types[o] = out
        return types


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _output_type(node, types: dict[str, int]) -> int | None:
    op = node.op_type
    if op == "Cast":
        return attr(node, "to")
    if op == "Constant":
        t = attr(node, "value")
        return t.data_type if t is not None else None
    if op == "QuantizeLinear":
        if len(node.input) > 2 and node.input[2]:
            return types.get(node.input[2])
        return attr(node, "output_dtype") or UINT8
    if op == "DequantizeLinear":
        return attr(node, "output_dtype") or types.get(node.input[1])
    if op in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero"):
        return INT64
    if op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN",
              "IsInf"):
        return BOOL
    for i in node.input:
        if i and i in types:
            return types[i]
    return None


def default_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def compute_depths(g: Graph) -> dict[str, int]:
    """Longest compute path from the graph inputs to each tensor (Q/DQ/Cast/Identity do not count)."""
    depth: dict[str, int] = {}
    for n in g.nodes:
        d = max((depth.get(i, 0) for i in n.input if i), default=0)
        step = 0 if n.op_type in PASS_THROUGH_OPS else 1
        for o in n.output:
            depth[o] = d + step
    return depth


def is_quantized(model) -> bool:
    """True when the graph computes in int8: QuantizeLinear/DequantizeLinear or a QOperator / integer op."""
    graph = model.graph if hasattr(model, "graph") else model
    return any(n.op_type in QDQ_OPS or n.op_type in QOPERATOR_OPS for n in graph.node)


def graph_precision(model) -> str:
    """Precision a graph computes in, read from the graph itself: ``"int8"``, ``"fp16"`` or ``"fp32"``.

    Q/DQ (or QOperator) nodes → int8; otherwise any float16 tensor (initializer, graph input/output, value_info,
    Constant, Cast target) → fp16; otherwise fp32. This is what decides TensorRT's precision: a strongly typed
    network builds exactly the types the graph contains. ``model`` is a ModelProto or a path (weights not read).
    """
    proto, _ = as_model(model, weights=False)
    graph = proto.graph
    if is_quantized(proto):
        return "int8"
    if any(t.data_type == FLOAT16 for t in graph.initializer):
        return "fp16"
    # a float16 graph input that is only cast to float32 is an input dtype, not float16 compute
    widened = {n.input[0] for n in graph.node if n.op_type == "Cast" and attr(n, "to") == FLOAT and n.input}
    only_cast = {i.name for i in graph.input
                 if i.name in widened and all(n.op_type == "Cast" and attr(n, "to") == FLOAT
                                              for n in graph.node if i.name in n.input)}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name in only_cast:
            continue
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == FLOAT16:
            return "fp16"
    for node in graph.node:
        if node.op_type == "Cast" and attr(node, "to") == FLOAT16:
            return "fp16"
        if node.op_type == "Constant":
            t = attr(node, "value")
            if t is not None and getattr(t, "data_type", None) == FLOAT16:
                return "fp16"
    return "fp32"


def holds_fp16_tensors(model) -> bool:
    """Does the graph (a path or ModelProto) hold any float16 initializer? True for the FP16 artifact and for the
    TensorRT INT8 form (Q/DQ inside the FP16 graph); after ORT's level-"all" optimizer, only where an FP16 kernel
    runs (it folds the weights of a Conv it runs in FP32)."""
    proto, _ = as_model(model, weights=True)
    return any(t.data_type == FLOAT16 for t in proto.graph.initializer)


#: ops that pass a classifier's output through unchanged in meaning (shape only)
_OUTPUT_PASSTHROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Cast")


def output_kind(model) -> str:
    """What the classifier's first output holds: ``"probabilities"`` (a Softmax ends the graph, as third-party
    exports often do), ``"log_probabilities"`` (LogSoftmax) or ``"logits"``. Shape-only ops after the softmax are
    looked through. Drift and agreement code compares ``log(p)`` for probabilities: softmax(log p) = p, so KL and
    argmax mean the same thing as on logits."""
    g = Graph(model)
    name = model.graph.output[0].name
    node = g.producer.get(name)
    while node is not None and node.op_type in _OUTPUT_PASSTHROUGH and node.input:
        node = g.producer.get(node.input[0])
    if node is None:
        return "logits"
    return {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(node.op_type, "logits")
