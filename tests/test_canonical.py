"""Canonicalisation of foreign graphs (sedeploy.passes.canonical), in onnxscript's rewriter-test style: op types
after the pass, ONNX Runtime numerics equal to the input model, and the full ONNX checker on the result."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import run_model
from sedeploy.passes.canonical import MIN_OPSET, canonicalize

RNG = np.random.default_rng(7)


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name))


def _model(nodes, inits=(), *, out_shape=("N", 4, 8, 8), opset=17, in_shape=("N", 3, 8, 8)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _same(a, b, batch=2, shape=(3, 8, 8), tol=1e-5):
    x = RNG.normal(size=(batch, *shape)).astype(np.float32)
    ya, yb = run_model(a, x), run_model(b, x)
    assert np.abs(ya - yb).max() <= tol * max(1.0, float(np.abs(ya).max())), np.abs(ya - yb).max()


def _ops(m):
    return Counter(n.op_type for n in m.graph.node)


def _w(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def test_conv_bias_add_bn_identity_and_constant_reshape_fold_into_one_conv():
    """paddle2onnx's spelling: Conv without bias + Add(Reshape(Constant b, [1, C, 1, 1])) + BatchNormalization +
    an Identity → one Conv with a bias."""
    nodes = [_const("w", _w(4, 3, 3, 3)), _const("b", _w(4)), _const("shape", np.array([1, 4, 1, 1], np.int64)),
             helper.make_node("Reshape", ["b", "shape"], ["b4"]),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b4"], ["cb"]),
             helper.make_node("Identity", ["cb"], ["ci"]),
             helper.make_node("BatchNormalization", ["ci", "g", "beta", "mean", "var"], ["y"], epsilon=1e-5)]
    inits = [numpy_helper.from_array(np.abs(_w(4)) + 0.5, "g"), numpy_helper.from_array(_w(4), "beta"),
             numpy_helper.from_array(_w(4), "mean"), numpy_helper.from_array(np.abs(_w(4)) + 0.1, "var")]
    m = _model(nodes, inits)
    out, report = canonicalize(m)
    assert _ops(out) == {"Conv": 1}
    assert len(out.graph.node[0].input) == 3  # the Add became the Conv's bias
    assert report.changed and report.removed()["BatchNormalization"] == 1
    onnx.checker.check_model(out, full_check=True)
    _same(m, out)


def test_pad_computed_from_constant_of_shape_folds_into_the_conv():
    """The TorchScript exporter's TF-"same" padding: pads from ConstantOfShape → Concat → Cast feed a Pad."""
    zero = numpy_helper.from_array(np.zeros(1, np.int64))
    nodes = [_const("n", np.array([6], np.int64)), helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=zero),
             _const("hw", np.array([1, 1], np.int64)), helper.make_node("Concat", ["zeros", "hw"], ["p8"], axis=0),
             helper.make_node("Cast", ["p8"], ["pads"], to=TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads"], ["xp"]), _const("w", _w(4, 3, 2, 2)),
             helper.make_node("Conv", ["xp", "w"], ["y"])]
    m = _model(nodes, out_shape=("N", 4, 8, 8))
    out, _ = canonicalize(m)
    assert _ops(out) == {"Conv": 1}
    onnx.checker.check_model(out, full_check=True)
    _same(m, out)


@pytest.mark.parametrize("shape", [(8,), (1, 1, 8), (2, 4, 1, 1), (), (1, 1, 1, 1)])
def test_an_add_that_is_not_per_channel_stays_an_add(shape):
    nodes = [_const("w", _w(4, 3, 1, 1)), helper.make_node("Conv", ["x", "w"], ["c"]),
             _const("b", _w(*shape)), helper.make_node("Add", ["c", "b"], ["y"])]
    out_shape = ("N", 4, 8, 8) if shape != (2, 4, 1, 1) else (2, 4, 8, 8)
    m = _model(nodes, out_shape=out_shape)
    out, _ = canonicalize(m)
    assert _ops(out)["Add"] == 1
    _same(m, out, batch=2)


def test_a_graph_with_nothing_to_fold_comes_back_byte_identical(tiny_onnx):
    proto = onnx.load(tiny_onnx)
    out, report = canonicalize(proto)
    if not report.changed:
        assert out.SerializeToString() == proto.SerializeToString()
    else:  # a sedeploy export may still hold foldable Constant nodes: then it computes the same
        _same(proto, out, shape=(3, 32, 32))
    # a second pass over a canonical graph changes nothing
    again, second = canonicalize(out)
    assert not second.changed and again.SerializeToString() == out.SerializeToString()


def test_an_old_opset_is_converted_up():
    nodes = [_const("w", _w(4, 3, 3, 3)), helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    m = _model(nodes, opset=9)
    out, report = canonicalize(m, label="old.onnx")
    assert report.opset_before == 9 and report.opset_after == MIN_OPSET
    onnx.checker.check_model(out, full_check=True)
    _same(m, out)


def test_control_flow_and_custom_ops_are_refused_with_their_names():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             _const("zero", np.array(0.0, np.float32)), helper.make_node("Greater", ["mx", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="branchy", then_branch=then, else_branch=then)]
    with pytest.raises(SedeployError, match=r"'mine.onnx' holds control flow: If 'branchy'"):
        canonicalize(_model(nodes, out_shape=("N", 3, 8, 8)), label="mine.onnx")
    custom = _model([helper.make_node("FancyConv", ["x"], ["y"], domain="acme.ops")], out_shape=("N", 3, 8, 8))
    custom.opset_import.append(helper.make_opsetid("acme.ops", 1))
    with pytest.raises(SedeployError, match=r"'c.onnx' uses operator\(s\) outside the standard ONNX domain: "
                                            r"acme.ops::FancyConv"):
        canonicalize(custom, label="c.onnx")


def test_inconsistent_shapes_are_named():
    nodes = [_const("c", _w(4, 1, 1)), helper.make_node("Add", ["x", "c"], ["y"])]  # 3 channels + 4: no broadcast
    with pytest.raises(SedeployError, match=r"ONNX shape inference rejects 'bad.onnx'"):
        canonicalize(_model(nodes, out_shape=("N", 3, 8, 8)), label="bad.onnx")


ZOO = ["efficientnet_lite0_torch_legacy.onnx", "mobilenet_v1_0.25_224_tf2onnx_nchw.onnx",
       "ppocr_textdir_cls_paddle2onnx_op13.onnx", "squeezenet1.1_gluon_webnn.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_the_zoo_models_canonicalise_with_parity(shared_data, name):
    m = onnx.load(shared_data / "models" / name)
    out, report = canonicalize(m, label=name)
    onnx.checker.check_model(out, full_check=True)
    ops = _ops(out)
    assert not {"Constant", "Identity", "BatchNormalization", "ConstantOfShape", "Pad"} & set(ops), ops
    hw = (48, 192) if name.startswith("ppocr") else (224, 224)
    batch = 1 if "tf2onnx" in name else 3
    x = np.random.default_rng(0).uniform(-1, 1, size=(batch, 3, *hw)).astype(np.float32)
    ya, yb = run_model(m, x), run_model(out, x)
    assert np.abs(ya - yb).max() <= 1e-5 * max(1.0, float(np.abs(ya).max()))
