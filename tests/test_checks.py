"""TensorRT Q/DQ validator (sedeploy.checks): a hand-built graph in TensorRT's form passes; one corruption per
rule in RULES fails with that rule named; precision summaries of FP32 / FP16 / Q/DQ graphs; inspect_model.

The reference graph is one SE residual block in the form TensorRT wants (Q/DQ = a QuantizeLinear →
DequantizeLinear pair; weights are int8 initializers behind a per-channel DequantizeLinear, axis 0):

    xq = Q/DQ(x)
    c2 = Conv(Q/DQ(Relu(Conv(xq, w1))), w2)
    gate = Sigmoid(Conv(Q/DQ(Relu(Conv(Q/DQ(ReduceMean(c2)), wf1))), wf2))   # pool and gate inputs stay float
    y = Relu(Add(Mul(c2, gate), xq))                                        # only the skip input is quantized
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sedeploy.errors import SedeployError
from sedeploy.checks import (check_trt_qdq, format_inspection, format_precision, format_report, inspect_model,
                             rules_table, summarize_precision)
from sedeploy.checks.trt_rules import RULES

C = 8  # channels
SE = 4  # SE bottleneck width
RNG = np.random.default_rng(0)

def _w(shape):
    return RNG.normal(0, 0.3, shape).astype(np.float32)

WEIGHTS = {"w1": _w((C, C, 3, 3)), "w2": _w((C, C, 3, 3)), "wf1": _w((SE, C, 1, 1)), "wf2": _w((C, SE, 1, 1))}
BIASES = {"b1": _w((C,)), "b2": _w((C,)), "bf1": _w((SE,)), "bf2": _w((C,))}

class Builder:
    """Collects nodes and initializers; ``qdq(t)`` inserts an activation Q/DQ pair, ``wdq(name)`` an int8 weight."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, outputs, name=None, **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs))
        return outputs[0]

    def qdq(self, t, scale=0.05, zp=np.int8(0), axis=None):
        s = self.init(f"{t}_s", np.asarray(scale, getattr(scale, "dtype", np.float32)))
        inputs = [t, s]
        if zp is not None:
            inputs.append(self.init(f"{t}_zp", np.asarray(zp)))
        attrs = {} if axis is None else {"axis": axis}
        q = self.node("QuantizeLinear", inputs, [f"{t}_q"], **attrs)
        return self.node("DequantizeLinear", [q, *inputs[1:]], [f"{t}_dq"], **attrs)

    def wdq(self, name, axis=0, dtype=np.int8, per_channel=True):
        w = WEIGHTS[name]
        red = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=red) / 127).astype(np.float32) if per_channel else \
            np.float32(np.abs(w).max() / 127)
        shape = [1] * w.ndim
        if per_channel:
            shape[axis] = -1
        q = np.clip(np.round(w / np.reshape(scale, shape)), -127, 127).astype(dtype)
        self.init(f"{name}_i8", q)
        self.init(f"{name}_s", scale)
        self.init(f"{name}_zp", np.zeros(np.shape(scale), dtype))
        attrs = {"axis": axis} if per_channel else {}
        return self.node("DequantizeLinear", [f"{name}_i8", f"{name}_s", f"{name}_zp"], [f"{name}_dq"], **attrs)

    def model(self, opset=18, extra_outputs=(), domains=()):
        graph = helper.make_graph(
            self.nodes, "se_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8]),
             *[helper.make_tensor_value_info(o, t, None) for o, t in extra_outputs]], self.inits)
        opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
        return helper.make_model(graph, opset_imports=opsets)

def se_block(*, quantize=True, **bad):
    """The reference block; ``bad`` switches on one corruption (see CORRUPTIONS)."""
    b = Builder()
    for k, v in BIASES.items():
        b.init(k, v)
    qdq = b.qdq if quantize else (lambda t, **_: t)
    wdq = b.wdq if quantize else (lambda name, **_: b.init(name, WEIGHTS[name]))
    if bad.get("act"):  # corrupt the input activation's Q/DQ parameters
        xq = b.qdq("x", **bad["act"])
    else:
        xq = qdq("x")
    conv1_in = "x" if bad.get("float_activation") else xq
    w1 = wdq("w1", **bad.get("w1", {}))
    if bad.get("qoperator") == "QLinearConv":
        b.init("x_s2", np.float32(0.05))
        b.init("x_zp2", np.int8(0))
        b.init("y1_s", np.float32(0.1))
        b.init("y1_zp", np.int8(0))
        c1q = b.node("QLinearConv", ["x_q", "x_s2", "x_zp2", "w1_i8", "w1_s", "w1_zp", "y1_s", "y1_zp"], ["c1_q"],
                     pads=[1, 1, 1, 1])
        c1 = b.node("DequantizeLinear", [c1q, "y1_s", "y1_zp"], ["c1"])
    elif bad.get("qoperator") == "ConvInteger":
        acc = b.node("ConvInteger", ["x_q", "w1_i8"], ["c1_i32"], pads=[1, 1, 1, 1])
        c1 = b.node("Cast", [acc], ["c1"], to=TensorProto.FLOAT)
    else:
        bias1 = "b1"
        if bad.get("bias") == "int32":
            b.init("b1_i32", np.round(BIASES["b1"] / 0.001).astype(np.int32))
            b.init("b1_i32_s", np.float32(0.001))
            bias1 = b.node("DequantizeLinear", ["b1_i32", "b1_i32_s"], ["b1_dq"])
        elif bad.get("bias") == "per-channel-int8":
            b.init("b1_i8", np.round(BIASES["b1"] / 0.01).astype(np.int8))
            b.init("b1_i8_s", np.full(C, 0.01, np.float32))
            b.init("b1_i8_zp", np.zeros(C, np.int8))
            bias1 = b.node("DequantizeLinear", ["b1_i8", "b1_i8_s", "b1_i8_zp"], ["b1_dq"], axis=0)
        c1 = b.node("Conv", [conv1_in, w1, bias1], ["c1"], pads=[1, 1, 1, 1])
    r1 = b.node("Relu", [c1], ["r1"])
    if bad.get("weighted_float"):
        c2 = b.node("Conv", [r1, b.init("w2", WEIGHTS["w2"]), "b2"], ["c2"], pads=[1, 1, 1, 1])
    else:
        r1q = qdq("r1")
        if bad.get("pair_mismatch"):
            b.nodes[-1].input[1] = b.init("r1_s_other", np.float32(0.07))
        if bad.get("dq_not_q"):
            cast = b.node("Cast", [r1], ["r1_i8"], to=TensorProto.INT8)
            b.init("r1_s_cast", np.float32(0.05))
            r1q = b.node("DequantizeLinear", [cast, "r1_s_cast"], ["r1_castdq"])
        c2 = b.node("Conv", [r1q, wdq("w2"), "b2"], ["c2"], pads=[1, 1, 1, 1])
    pool_in = qdq("c2") if bad.get("quantized_pool") else c2
    b.init("axes", np.array([2, 3], np.int64))
    b.node("ReduceMean", [pool_in, "axes"], ["p"], keepdims=1)
    f1 = b.node("Conv", [qdq("p"), wdq("wf1"), "bf1"], ["f1"])
    b.node("Relu", [f1], ["f1r"])
    f2 = b.node("Conv", [qdq("f1r"), wdq("wf2"), "bf2"], ["f2"])
    gate = b.node("Sigmoid", [qdq("f2") if bad.get("quantized_gate") else f2], ["gate"])
    if bad.get("mixed_types"):  # the gate cast to float16 meets the float32 trunk: no implicit promotion
        gate = b.node("Cast", [gate], ["gate16"], to=TensorProto.FLOAT16)
    m = c2 if bad.get("plain_residual") else b.node("Mul", [c2, gate], ["m"])  # plain: Add(conv, skip)
    add_in = qdq(m) if bad.get("both_add_inputs") else m
    a = b.node("Add", [add_in, xq], ["a"])
    domains = ()
    if bad.get("custom"):
        b.node("Gelu", [a], ["y"], domain="com.microsoft")
        domains = ("com.microsoft",)
    else:
        b.node("Relu", [a], ["y"])
    if bad.get("q_output"):
        extra = (("r1_q", TensorProto.INT8),)
    else:
        extra = ()
    if bad.get("runtime_scale"):
        n = next(n for n in b.nodes if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        b.node("Identity", ["x_s"], ["x_s_runtime"])
        n.input[1] = "x_s_runtime"
    return b.model(opset=bad.get("opset", 18), extra_outputs=extra, domains=domains)

#: rule id → (corruption, the rule ids that may be reported beside it)
CORRUPTIONS = {
    "no-qdq": (dict(quantize=False), set()),
    "opset": (dict(opset=12), set()),
    # QOperator output is int8 with no DequantizeLinear pairing: q-without-dq / dq-input-not-q come along
    "qoperator": (dict(qoperator="QLinearConv"), {"q-without-dq", "dq-input-not-q"}),
    "zero-point-nonzero": (dict(act=dict(zp=np.int8(3))), set()),
    "zero-point-dtype": (dict(act=dict(zp=np.uint8(0))), set()),
    "qparam-not-constant": (dict(runtime_scale=True), set()),
    "scale-invalid": (dict(act=dict(scale=0.0)), set()),
    "activation-per-channel": (dict(act=dict(scale=np.full(C, 0.05, np.float32), zp=np.zeros(C, np.int8), axis=1)),
                               set()),
    "per-channel-not-weight": (dict(bias="per-channel-int8"), set()),
    "weight-axis": (dict(w1=dict(axis=1)), set()),
    "int32-dequantize": (dict(bias="int32"), {"zero-point-dtype"}),
    "mixed-weighted": (dict(float_activation=True), set()),
    "q-without-dq": (dict(q_output=True), set()),
    "qdq-pair-mismatch": (dict(pair_mismatch=True), set()),
    "dq-input-not-q": (dict(dq_not_q=True), set()),
    "custom-domain": (dict(custom=True), set()),
    "residual-add": (dict(both_add_inputs=True, plain_residual=True), set()),
    # an float16 scale on a float32 graph (opset 19 allows it): DequantizeLinear outputs float16 into float32 ops
    "strong-typing-scale": (dict(act=dict(scale=np.float16(0.05)), opset=19), set()),
    "strong-typing-mixed": (dict(mixed_types=True), set()),
    "sensitive-op-quantized": (dict(quantized_gate=True), set()),
    "weighted-op-float": (dict(weighted_float=True), set()),
}

def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]

# ---------------------------------------------------------------------------------------------------- the rules
def test_reference_block_is_valid_and_passes():
    model = se_block()
    onnx.checker.check_model(model, full_check=True)
    x = RNG.normal(size=(1, C, 8, 8)).astype(np.float32)
    y_q, y_f = _run(model, x), _run(se_block(quantize=False), x)
    # the Q/DQ graph really computes the block (int8 rounding only), not something degenerate
    assert np.abs(y_f).max() > 0.5 and np.abs(y_q - y_f).max() < 0.15 * np.abs(y_f).max()
    report = check_trt_qdq(model)
    assert report.ok and not report.errors and not report.warnings, format_report(report)
    # Q/DQ on x, r1, p, f1r; int8 weights w1, w2, wf1, wf2 (per-channel)
    assert report.qdq == {"quantize_linear": 4, "dequantize_linear": 8, "per_channel_dequantize": 4}

def test_every_rule_has_a_corruption():
    assert set(CORRUPTIONS) == set(RULES)

@pytest.mark.parametrize("rule", sorted(RULES))
def test_corruption_fails_with_its_rule(rule):
    bad, allowed = CORRUPTIONS[rule]
    report = check_trt_qdq(se_block(**bad))
    severity = RULES[rule].severity
    found = report.rules(severity)
    assert rule in found, f"{rule} not reported:\n{format_report(report)}"
    assert report.rules() <= {rule} | allowed, f"unexpected extra violations:\n{format_report(report)}"
    assert report.ok == (severity == "warning")
    v = next(v for v in (*report.errors, *report.warnings) if v.rule == rule)
    assert v.severity == severity and v.found and v.fix
    assert f"[{rule}]" in str(v) and f"[{rule}]" in format_report(report)
    assert ("FAILED" if severity == "error" else "OK") in format_report(report).splitlines()[0]

@pytest.mark.parametrize("bad, rule", [
    (dict(qoperator="ConvInteger"), "qoperator"),
    (dict(quantized_pool=True), "sensitive-op-quantized"),
    (dict(act=dict(zp=None)), "zero-point-dtype"),  # QuantizeLinear without zero point: uint8
    (dict(act=dict(scale=-0.05)), "scale-invalid"),
    (dict(w1=dict(axis=0, per_channel=False)), None),  # per-tensor weights are allowed
])
def test_more_variants(bad, rule):
    report = check_trt_qdq(se_block(**bad))
    if rule is None:
        assert report.ok and not report.warnings, format_report(report)
    else:
        assert rule in report.rules(), format_report(report)

def test_violation_names_the_node_and_what_was_found():
    report = check_trt_qdq(se_block(act=dict(zp=np.int8(3))))
    names = {v.node for v in report.errors}
    assert names == {"QuantizeLinear 'x_q'", "DequantizeLinear 'x_dq'"}
    assert all("zero point [3]" in v.found for v in report.errors)
    report = check_trt_qdq(se_block(w1=dict(axis=1)))
    assert any("expected 0" in v.found and "Conv 'c1'" in v.found for v in report.errors)

def test_residual_add_advice_does_not_apply_to_the_se_scale():
    """In SE-ResNet the Add's other input is the SE Mul, not a convolution: nothing to fuse into, no warning."""
    report = check_trt_qdq(se_block(both_add_inputs=True))
    assert report.ok and "residual-add" not in report.rules(), format_report(report)


def test_residual_add_with_only_the_branch_quantized_is_a_warning():
    model = se_block(plain_residual=True)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    add.input[:] = ["c2", "x"]  # skip in float ...
    b = Builder()
    b.qdq("c2")  # ... residual branch (a convolution) quantized
    model.graph.node.extend(b.nodes[:2])
    model.graph.initializer.extend(b.inits)
    add.input[0] = "c2_dq"
    nodes = list(model.graph.node)  # keep topological order: move the Add after its new input
    nodes.remove(add)
    nodes.insert(len(nodes), add)
    relu = next(n for n in nodes if n.output[0] == "y")
    nodes.remove(relu)
    nodes.append(relu)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    report = check_trt_qdq(model)
    assert report.ok and report.rules() == {"residual-add"}
    assert "the skip input 'x' is not" in report.warnings[0].found

def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(SedeployError, match="does not exist"):
        check_trt_qdq(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(SedeployError, match="not a readable ONNX file"):
        summarize_precision(junk)

def test_rules_table_lists_every_rule_with_its_source():
    text = rules_table()
    for rule, r in RULES.items():
        assert f"{rule} ({r.severity})" in text and r.source in text

# ----------------------------------------------------------------------------------------------------- precision
def test_precision_summary_fp32():
    s = summarize_precision(se_block(quantize=False))
    assert s["precision"] == "fp32" and s["opset"] == 18
    assert s["ops"] == {"Add": {"fp32": 1}, "Conv": {"fp32": 4}, "Mul": {"fp32": 1}, "ReduceMean": {"fp32": 1},
                        "Relu": {"fp32": 3}, "Sigmoid": {"fp32": 1}}
    assert s["totals"] == {"fp32": 11} and s["boundary"] == {}
    assert s["initializers"]["FLOAT"]["elements"] == sum(a.size for a in (*WEIGHTS.values(), *BIASES.values()))
    assert s["inputs"] == {"x": "FLOAT"} and s["outputs"] == {"y": "FLOAT"}

def test_precision_summary_qdq():
    s = summarize_precision(se_block())
    assert s["precision"] == "int8"
    # the four convs read int8 data and int8 weights; everything else reads float tensors
    assert s["ops"]["Conv"] == {"int8": 4}
    for op in ("ReduceMean", "Sigmoid", "Mul", "Add"):  # Add: the residual branch input is float
        assert s["ops"][op] == {"fp32": 1}, op
    assert s["ops"]["Relu"] == {"fp32": 3}
    assert s["boundary"] == {"QuantizeLinear": 4, "DequantizeLinear": 8}
    # int8 weights + their per-channel zero points (C + C + SE + C) + 4 activation zero points
    zero_points = 3 * C + SE + 4
    assert s["initializers"]["INT8"]["elements"] == sum(w.size for w in WEIGHTS.values()) + zero_points

def test_precision_summary_fp16(tmp_path):
    from sedeploy.fp16 import convert_fp16

    path = tmp_path / "fp16.onnx"
    convert_fp16(se_block(quantize=False), path, keep_fp32="se_gate",
                 verify_inputs=RNG.normal(size=(1, C, 8, 8)).astype(np.float32))
    s = summarize_precision(path)
    assert s["precision"] == "fp16+fp32"
    assert s["ops"]["Conv"] == {"fp16": 3, "fp32": 1} and s["ops"]["Sigmoid"] == {"fp32": 1}
    assert s["totals"] == {"fp16": 9, "fp32": 2}
    # Casts: graph input and output + into and out of the kept gate
    assert s["boundary"] == {"Cast": 4}
    assert s["inputs"] == {"x": "FLOAT"} and s["outputs"] == {"y": "FLOAT"}
    text = format_precision(s)
    assert "Precision: fp16+fp32 (opset 18)" in text and "boundary nodes: 4 Cast" in text
    conv_row = next(line for line in text.splitlines() if line.strip().startswith("Conv"))
    assert conv_row.split() == ["Conv", "3", "1"]

# ---------------------------------------------------------------------------------------------------- inspection
def test_inspect_float_model(tmp_path):
    path = tmp_path / "fp32.onnx"
    onnx.save(se_block(quantize=False), str(path))
    d = inspect_model(path)
    assert d["ok"] is True and d["trt_qdq"] is None and d["opset"] == 18 and d["path"] == str(path)
    assert d["precision"]["totals"] == {"fp32": 11}
    text = format_inspection(d)
    assert str(path) in text and "not applicable" in text and "Conv" in text

@pytest.mark.parametrize("bad, ok", [({}, True), (dict(act=dict(zp=np.int8(3))), False),
                                     (dict(qoperator="QLinearConv"), False)])
def test_inspect_quantized_model(tmp_path, bad, ok):
    import json

    path = tmp_path / "q.onnx"
    onnx.save(se_block(**bad), str(path))
    d = inspect_model(path)
    assert d["ok"] is ok and d["trt_qdq"] is not None and d["trt_qdq"]["ok"] is ok
    assert d["trt_qdq"]["model"] == str(path)
    json.dumps(d)  # the CLI prints it with --json
    text = format_inspection(d)
    assert ("OK" if ok else "FAILED") in text
    assert text.count("Precision:") == 1  # the table once, not twice
    if not ok:
        assert "Errors:" in text and "Fix:" in text


# --------------------------------------------------------------------------- sedeploy's own TensorRT Q/DQ artifact
@pytest.fixture(scope="module")
def trt_artifacts(tiny_trained_art, tmp_path_factory):
    from sedeploy.quantize import calibrate
    from sedeploy.quantize import quantize_model

    art = tiny_trained_art
    out = tmp_path_factory.mktemp("trt")
    cal = calibrate(art.onnx_path, art.calib_dir, method="minmax", count=64, cache_dir=out / "calib",
                    progress=False, preprocess=art.preprocess)
    paths = {}
    for se in ("int8", "fp32"):
        paths[se] = out / f"tiny.int8-trt-se{se}.onnx"
        quantize_model(art.onnx_path, cal, paths[se], flavour="trt", se=se)
    return paths


def test_trt_flavour_of_trained_model_passes(trt_artifacts):
    report = check_trt_qdq(trt_artifacts["int8"])
    assert report.ok and not report.warnings, format_report(report)
    convs = report.precision["ops"]["Conv"]
    assert convs.get("int8", 0) >= 20 and "fp32" not in convs  # every conv really runs in int8
    assert report.qdq["per_channel_dequantize"] == convs["int8"] + report.precision["ops"]["Gemm"].get("int8", 0)
    # SE kept in float: passes; the SE 1×1 convs are reported as float weighted ops (a warning, by design)
    report = check_trt_qdq(trt_artifacts["fp32"])
    assert report.ok and report.rules() <= {"weighted-op-float"}, format_report(report)
    assert {v.node.split()[0] for v in report.warnings} == {"Conv"}


def test_corrupted_trt_flavour_fails(trt_artifacts, tmp_path):
    model = onnx.load(str(trt_artifacts["int8"]))
    g = {t.name: t for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = numpy_helper.to_array(g[q.input[2]]).copy()
    zp[...] = 5
    g[q.input[2]].CopyFrom(numpy_helper.from_array(zp, q.input[2]))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    d = inspect_model(path)
    assert d["ok"] is False and "zero-point-nonzero" in {v["rule"] for v in d["trt_qdq"]["errors"]}
