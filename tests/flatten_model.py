"""A small ONNX classifier built with onnx.helper, flattened the way torch exports ``x.view(x.size(0), -1)``
(Shape → Gather(0) → Concat(-1) → Reshape), padded the way converters write a "same" padding (Pad whose pads are
computed from constants: Concat on axis 0, folded away by canonicalisation), in the variants the build must handle: a fixed batch, an
undeclared output shape, a float16 input cast to float32, any class count. Random weights (seeded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def flatten_classifier(path: Path, *, batch: int | str = "N", classes: int = 10, declare_output: bool = True,
                       fp16_input: bool = False, size: int = 16, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.3, (classes, 8)).astype(np.float32), "fc")
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    minus1 = numpy_helper.from_array(np.array([-1], np.int64), "minus1")
    begin = numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64), "begin")
    nodes = []
    x = "x"
    if fp16_input:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        x = "x32"
    nodes += [
        helper.make_node("Concat", ["begin", "begin"], ["pads"], axis=0),
        helper.make_node("Pad", [x, "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1),
    ]
    elem = TensorProto.FLOAT16 if fp16_input else TensorProto.FLOAT
    xi = helper.make_tensor_value_info("x", elem, [batch, 3, size, size])
    yo = (helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes]) if declare_output
          else helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "flat", [xi], [yo], [w, fc, zero, minus1, begin])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
