"""SE fusion pass: exported networks (counts, numerics, idempotency), every spelling on hand-built graphs, and
every near-miss refused with its reason."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sedeploy.errors import SedeployError
from sedeploy.passes import DEFAULT_FORM, FORMS, find_se_blocks, fuse_se_blocks

C, R, HW = 16, 4, 5
TOL = 1e-5


# --------------------------------------------------------------------------------------------- helpers


def ort_run(model: onnx.ModelProto, x: np.ndarray, optimization: str = "all") -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if optimization == "disabled":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """SE-ResNet-50 (opset 18 dynamo, opset 17 legacy), SE-ResNet-101 and plain ResNet-50 at 64 px, dynamic
    batch, random non-degenerate weights; exported once per session."""
    from sedeploy.export import export_onnx
    from sedeploy.model import build_model

    out = tmp_path_factory.mktemp("se-fusion")
    cache = {}

    def get(key):
        if key not in cache:
            depth, se, opset = key
            path = out / f"{depth}-{se}-{opset}.onnx"
            export_onnx(build_model(depth, se=se, seed=depth + opset), path, opset=opset, input_size=64)
            cache[key] = onnx.load(str(path))
        return cache[key]

    return get


def images(n=3, size=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


# ----------------------------------------------------------------------------------------- exported nets


@pytest.mark.slow
@pytest.mark.parametrize("depth,opset,blocks", [(50, 18, 16), (50, 17, 16), (101, 18, 33)])
def test_exported_se_resnet_fused_exactly(exported, depth, opset, blocks):
    model = exported((depth, True, opset))
    fused, report = fuse_se_blocks(model)
    assert (report.found, report.fused, report.refused) == (blocks, blocks, [])
    assert report.form == DEFAULT_FORM and report.nodes_before == len(model.graph.node)
    assert report.nodes_after == len(fused.graph.node)
    onnx.checker.check_model(fused, full_check=True)
    # the fused form: one GlobalAveragePool → Conv → Relu → Conv → Sigmoid → Mul(x, gate) per block
    sigmoids = [n for n in fused.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == blocks
    producers = {o: n for n in fused.graph.node for o in n.output}
    for s in sigmoids:
        fc2 = producers[s.input[0]]
        relu = producers[fc2.input[0]]
        fc1 = producers[relu.input[0]]
        pool = producers[fc1.input[0]]
        assert [fc2.op_type, relu.op_type, fc1.op_type, pool.op_type] == ["Conv", "Relu", "Conv",
                                                                          "GlobalAveragePool"]
        assert len(fc1.input) == 3 and len(fc2.input) == 3
        (mul,) = [n for n in fused.graph.node if s.output[0] in n.input]
        assert mul.op_type == "Mul" and list(mul.input) == [pool.input[0], s.output[0]]
    if opset == 18:  # dynamo: every SE squeeze was a ReduceMean; only the head pool may remain one
        assert report.rewritten == blocks and ops(fused)["ReduceMean"] <= 1
        assert ops(fused)["GlobalAveragePool"] >= blocks
    else:  # legacy export already is the standard form
        assert report.already_fused == blocks and report.rewritten == 0


@pytest.mark.slow
@pytest.mark.parametrize("depth,opset", [(50, 18), (50, 17)])
def test_exported_numerics_and_idempotency(exported, depth, opset):
    model = exported((depth, True, opset))
    fused, report = fuse_se_blocks(model)
    x = images()
    ref, got = ort_run(model, x), ort_run(fused, x)
    assert ref.std() > 0.1 and len(set(ref.argmax(1))) > 1  # weights are not degenerate
    diff = float(np.abs(ref - got).max())
    if opset == 17:  # the legacy export already is the standard form: nothing may change
        assert diff == 0.0
    else:
        # ReduceMean → GlobalAveragePool changes only the float32 summation order of the squeeze. With logits of
        # magnitude ~30, that rounding is of the same size as ONNX Runtime's own difference between optimization
        # levels on the *unfused* graph, so the absolute 1e-5 bound is applied relative to the logit scale and
        # the change must not exceed ORT's own noise floor.
        floor = float(np.abs(ref - ort_run(model, x, optimization="disabled")).max())
        assert diff <= max(TOL, floor) and diff <= TOL * np.abs(ref).max(), (diff, floor)
    again, r2 = fuse_se_blocks(fused)
    assert (r2.found, r2.fused, r2.already_fused, r2.rewritten) == (report.found, report.found, report.found, 0)
    assert again.SerializeToString() == fused.SerializeToString()


@pytest.mark.slow
def test_plain_resnet_has_no_candidates(exported):
    model = exported((50, False, 18))
    fused, report = fuse_se_blocks(model)
    assert (report.found, report.fused, report.refused) == (0, 0, [])
    assert find_se_blocks(model) == []
    assert fused.SerializeToString() == model.SerializeToString()


def test_function_form(exported):
    model = exported((50, True, 18))
    fused, report = fuse_se_blocks(model, form="function")
    assert (report.found, report.fused) == (16, 16)
    onnx.checker.check_model(fused, full_check=True)
    assert ops(fused)["SEBlock"] == 16 and ops(fused)["Sigmoid"] == 0
    assert [(f.domain, f.name) for f in fused.functions] == [("sedeploy", "SEBlock")]
    x = images()
    ref = ort_run(model, x)
    assert np.abs(ref - ort_run(fused, x)).max() <= TOL * np.abs(ref).max()  # see the numerics test
    assert np.abs(ort_run(fused, x) - ort_run(fuse_se_blocks(model)[0], x)).max() <= TOL  # = the standard form
    again, r2 = fuse_se_blocks(fused, form="function")
    assert (r2.found, r2.already_fused, r2.rewritten) == (16, 16, 0)


def test_unknown_form_and_bad_input():
    with pytest.raises(SedeployError, match="form"):
        fuse_se_blocks(onnx.ModelProto(), form="plugin")
    with pytest.raises(SedeployError, match="ModelProto"):
        fuse_se_blocks(b"not a model")
    assert DEFAULT_FORM in FORMS


# ----------------------------------------------------------------------------------- hand-built graphs


class G:
    """A tiny graph: inp → Relu → x → [SE block] → y → Relu → out, with random weights."""

    def __init__(self, opset=13, seed=0):
        self.rng = np.random.default_rng(seed)
        self.opset, self.nodes, self.inits, self.extra_inputs, self.extra_outputs = opset, [], [], [], []
        self.nodes.append(helper.make_node("Relu", ["inp"], ["x"], name="pre"))
        self.k = 0

    def const(self, arr, name=None):
        self.k += 1
        name = name or f"c{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(self, *shape):
        return self.const((self.rng.standard_normal(shape) * 0.5).astype(np.float32))

    def node(self, op, inputs, name=None, **attrs):
        self.k += 1
        out = f"t{self.k}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or f"{op}_{self.k}", **attrs))
        return out

    def model(self, last):
        self.nodes.append(helper.make_node("Relu", [last], ["out"], name="post"))
        vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", C, HW, HW])  # noqa: E731
        graph = helper.make_graph(self.nodes, "se", [vi("inp"), *self.extra_inputs], [vi("out"),
                                                                                      *self.extra_outputs],
                                  self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])


def squeeze(g: G, kind: str, want_4d: bool) -> str:
    """The squeeze, returning N×C×1×1 when ``want_4d`` else N×C (adding Flatten/Reshape as exporters do)."""
    if kind == "gap":
        s = g.node("GlobalAveragePool", ["x"])
        keep = 1
    elif kind == "rm_attr":
        keep = 1 if want_4d else 0
        s = g.node("ReduceMean", ["x"], axes=[2, 3], keepdims=keep)
    elif kind == "rm_input":
        keep = 1
        s = g.node("ReduceMean", ["x", g.const(np.array([-2, -1], np.int64))], keepdims=1)
    elif kind == "rm_k0":  # keepdims 0 followed by Reshape (Conv FCs) or used directly (Gemm FCs)
        keep = 0
        s = g.node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)
        if want_4d:
            return g.node("Reshape", [s, g.const(np.array([-1, C, 1, 1], np.int64))])
    elif kind == "avgpool":  # AveragePool whose kernel covers the whole HW×HW map (TF/Keras converters)
        keep = 1
        s = g.node("AveragePool", ["x"], kernel_shape=[HW, HW], strides=[1, 1])
    elif kind == "rm_k0_unsq":
        keep = 0
        s = g.node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)
        if want_4d:
            return g.node("Unsqueeze", [s, g.const(np.array([2, 3], np.int64))])
    if not want_4d and keep == 1:
        return g.node("Flatten", [s], axis=1)
    return s


def fc(g: G, kind: str, v: str, cin: int, cout: int) -> str:
    if kind == "conv":
        return g.node("Conv", [v, g.w(cout, cin, 1, 1), g.w(cout)])
    if kind == "conv_nobias":
        return g.node("Conv", [v, g.w(cout, cin, 1, 1)])
    if kind == "gemm":
        return g.node("Gemm", [v, g.w(cout, cin), g.w(cout)], transB=1)
    if kind == "gemm_nt":
        return g.node("Gemm", [v, g.w(cin, cout), g.w(cout)])
    if kind == "matmul_add":
        return g.node("Add", [g.w(cout), g.node("MatMul", [v, g.w(cin, cout)])])
    if kind == "matmul":
        return g.node("MatMul", [v, g.w(cin, cout)])
    raise ValueError(kind)


def gate(g: G, kind: str, z: str) -> str:
    if kind == "sigmoid":
        return g.node("Sigmoid", [z])
    if kind == "hardsigmoid":
        return g.node("HardSigmoid", [z], alpha=0.25, beta=0.45)
    a = g.node("Add", [z, g.const(np.float32(3.0))])
    c = clip06(g, a)
    if kind == "hs_div":
        return g.node("Div", [c, g.const(np.float32(6.0))])
    if kind == "hs_mul6":  # six decimals, as a text-based converter writes 1/6
        return g.node("Mul", [c, g.const(np.float32(0.166667))])
    return g.node("Mul", [g.const(np.float32(1 / 6)), c])  # hs_mul, constant first


def clip06(g: G, v: str) -> str:
    """Clip(v, 0, 6): bounds as attributes below opset 11, as constant inputs from 11."""
    if g.opset < 11:
        return g.node("Clip", [v], min=0.0, max=6.0)
    return g.node("Clip", [v, g.const(np.float32(0.0)), g.const(np.float32(6.0))])


def se_model(sq="gap", fck="conv", gt="sigmoid", order="xg", unflatten="after", opset=13, seed=0, act="relu"):
    g = G(opset=18 if sq == "rm_input" else opset, seed=seed)
    conv = fck.startswith("conv")
    v = squeeze(g, sq, want_4d=conv)
    h = fc(g, fck, v, C, R)
    h = g.node("Relu", [h]) if act == "relu" else clip06(g, h)  # ReLU6 as Clip(0, 6)
    z = fc(g, fck, h, R, C)
    if not conv and unflatten == "before":
        z = g.node("Unsqueeze", [z, g.const(np.array([2, 3], np.int64))])
    s = gate(g, gt, z)
    if not conv and unflatten == "after":
        s = g.node("Reshape", [s, g.const(np.array([-1, C, 1, 1], np.int64))])
    if not conv and unflatten == "unsq_twice":  # torch's g.unsqueeze(-1).unsqueeze(-1)
        s = g.node("Unsqueeze", [g.node("Unsqueeze", [s, g.const(np.array([-1], np.int64))]),
                                 g.const(np.array([-1], np.int64))])
    if not conv and unflatten == "literal_batch":  # converters write the fixed batch into the shape
        s = g.node("Reshape", [s, g.const(np.array([2, C, 1, 1], np.int64))])
    y = g.node("Mul", ["x", s] if order == "xg" else [s, "x"], name="scale")
    return g.model(y)


VARIANTS = [
    dict(sq="gap", fck="conv", gt="sigmoid", order="xg"),
    dict(sq="gap", fck="conv", gt="sigmoid", order="gx"),
    dict(sq="rm_attr", fck="conv", gt="sigmoid"),
    dict(sq="rm_input", fck="conv", gt="hardsigmoid", order="gx"),
    dict(sq="rm_k0", fck="conv", gt="sigmoid"),
    dict(sq="rm_k0_unsq", fck="conv_nobias", gt="hs_div"),
    dict(sq="gap", fck="conv_nobias", gt="hs_mul", order="gx"),
    dict(sq="gap", fck="gemm", gt="sigmoid"),
    dict(sq="rm_attr", fck="gemm_nt", gt="hardsigmoid", unflatten="before"),
    dict(sq="rm_k0", fck="gemm", gt="sigmoid", order="gx"),
    dict(sq="gap", fck="matmul_add", gt="hs_div", unflatten="before"),
    dict(sq="rm_input", fck="matmul", gt="sigmoid", order="gx"),
    dict(sq="rm_k0", fck="matmul_add", gt="hs_mul"),
    # as other exporters write it: whole-map AveragePool, ReLU6 as Clip (inputs / attributes), 1/6 to six
    # decimals, Unsqueeze twice, a literal batch in the Reshape
    dict(sq="avgpool", fck="conv", gt="hs_div", act="relu6"),
    dict(sq="avgpool", fck="gemm", gt="hs_mul6", act="relu6", unflatten="unsq_twice"),
    dict(sq="avgpool", fck="matmul_add", gt="hardsigmoid", act="relu6", unflatten="literal_batch"),
    dict(sq="gap", fck="conv", gt="hs_div", act="relu6", opset=10),
    dict(sq="rm_k0", fck="gemm", gt="hs_mul", act="relu6", opset=10),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_variant_is_fused(variant):
    model = se_model(**variant)
    onnx.checker.check_model(model, full_check=True)
    (cand,) = find_se_blocks(model)
    assert cand.ok, cand.reason
    fused, report = fuse_se_blocks(model)
    canonical = variant == dict(sq="gap", fck="conv", gt="sigmoid", order="xg")  # already the standard form
    assert (report.found, report.fused, report.rewritten, report.refused) == (1, 1, int(not canonical), [])
    assert report.already_fused == int(canonical)
    onnx.checker.check_model(fused, full_check=True)
    gate_op = "Sigmoid" if variant["gt"] == "sigmoid" else "HardSigmoid"
    act_op = "Clip" if variant.get("act") == "relu6" else "Relu"
    assert [n.op_type for n in fused.graph.node] == ["Relu", "GlobalAveragePool", "Conv", act_op, "Conv", gate_op,
                                                     "Mul", "Relu"]
    mul = fused.graph.node[6]
    assert mul.input[0] == "x"  # canonical operand order
    assert not any(i.name.startswith("c") and i.name not in {n for x in fused.graph.node for n in x.input}
                   for i in fused.graph.initializer)  # no orphaned constants left behind
    batch = 2  # the literal-batch variant's Reshape holds 2
    x = np.random.default_rng(1).standard_normal((batch, C, HW, HW)).astype(np.float32) * 2
    ref, got = ort_run(model, x), ort_run(fused, x)
    assert ref.std() > 0.05
    assert np.abs(ref - got).max() <= TOL
    again, r2 = fuse_se_blocks(fused)
    assert (r2.found, r2.fused, r2.rewritten) == (1, 1, 0)
    assert again.SerializeToString() == fused.SerializeToString()


# ------------------------------------------------------------------------------------------ near misses


def _different_tensor():
    m = se_model()
    m.graph.node.insert(1, helper.make_node("Neg", ["inp"], ["other"], name="other"))
    mul = next(n for n in m.graph.node if n.name == "scale")
    mul.input[0] = "other"
    return m


def _shared_weight():
    m = se_model()
    fc1 = next(n for n in m.graph.node if n.op_type == "Conv")
    m.graph.node.append(helper.make_node("Conv", ["x", fc1.input[1]], ["side"], name="side_conv"))
    m.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    return m


def _intermediate_used():
    m = se_model()
    relu = next(n for n in m.graph.node if n.op_type == "Relu" and n.name not in ("pre", "post"))
    m.graph.node.append(helper.make_node("Identity", [relu.output[0]], ["leak"], name="leak"))
    m.graph.output.append(helper.make_tensor_value_info("leak", TensorProto.FLOAT, None))
    return m


def _intermediate_is_output():
    m = se_model()
    pool = next(n for n in m.graph.node if n.op_type == "GlobalAveragePool")
    m.graph.output.append(helper.make_tensor_value_info(pool.output[0], TensorProto.FLOAT, None))
    return m


def _axes_over_c():
    m = se_model(sq="rm_attr")
    rm = next(n for n in m.graph.node if n.op_type == "ReduceMean")
    del rm.attribute[:]
    rm.attribute.extend([helper.make_attribute("axes", [1, 3]), helper.make_attribute("keepdims", 1)])
    return m


def _keepdims0_into_conv():
    m = se_model(sq="rm_attr")
    rm = next(n for n in m.graph.node if n.op_type == "ReduceMean")
    rm.attribute[1].i = 0
    return m


def _unsqueeze_wrong_axes():
    m = se_model(sq="rm_k0_unsq")
    unsq = next(n for n in m.graph.node if n.op_type == "Unsqueeze")
    axes = next(i for i in m.graph.initializer if i.name == unsq.input[1])
    axes.CopyFrom(numpy_helper.from_array(np.array([1, 2], np.int64), axes.name))
    return m


def _weight_is_input():
    m = se_model()
    fc2 = [n for n in m.graph.node if n.op_type == "Conv"][1]
    init = next(i for i in m.graph.initializer if i.name == fc2.input[1])
    m.graph.initializer.remove(init)
    m.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, [C, R, 1, 1]))
    return m


def _weight_overridable():
    m = se_model()
    fc1 = next(n for n in m.graph.node if n.op_type == "Conv")
    m.graph.input.append(helper.make_tensor_value_info(fc1.input[1], TensorProto.FLOAT, [R, C, 1, 1]))
    return m


def _weight_computed():
    m = se_model()
    fc1 = next(n for n in m.graph.node if n.op_type == "Conv")
    m.graph.node.insert(0, helper.make_node("Neg", [fc1.input[1]], ["negw"], name="negw"))
    fc1.input[1] = "negw"
    return m


def _pool_not_whole_map():
    m = se_model(sq="avgpool")
    pool = next(n for n in m.graph.node if n.op_type == "AveragePool")
    pool.attribute[0].ints[:] = [3, 3]  # kernel 3×3 on the 5×5 map: a 3×3 output, not a global mean
    return m


def _pool_padded():
    m = se_model(sq="avgpool")
    pool = next(n for n in m.graph.node if n.op_type == "AveragePool")
    pool.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    pool.attribute.append(helper.make_attribute("count_include_pad", 1))
    return m


def _pool_unknown_map():
    m = se_model(sq="avgpool")
    for vi in (m.graph.input[0], m.graph.output[0]):
        for d, name in zip(vi.type.tensor_type.shape.dim[2:], ("H", "W")):
            d.dim_param = name
    return m


def _clip_0_5_between():
    m = se_model()
    relu = next(n for n in m.graph.node if n.op_type == "Relu" and n.name not in ("pre", "post"))
    relu.op_type = "Clip"
    lo, hi = "clip_lo", "clip_hi"
    m.graph.initializer.extend([numpy_helper.from_array(np.float32(0.0), lo),
                                numpy_helper.from_array(np.float32(5.0), hi)])
    relu.input.extend([lo, hi])
    return m


def _two_unsqueezes_wrong():
    m = se_model(fck="gemm", unflatten="unsq_twice")
    first = next(n for n in m.graph.node if n.op_type == "Unsqueeze")
    axes = next(i for i in m.graph.initializer if i.name == first.input[1])
    axes.CopyFrom(numpy_helper.from_array(np.array([1], np.int64), axes.name))  # N×1×C, then N×1×C×1
    return m


NEAR_MISSES = {
    "pool kernel smaller than the map": (_pool_not_whole_map, "has kernel [3, 3] on a 5×5 map"),
    "pool padded": (_pool_padded, "pads or dilates"),
    "pool over a map of unknown size": (_pool_unknown_map, "reads a map of unknown size"),
    "Clip(0, 5) between the FCs": (_clip_0_5_between, "not a Relu or a ReLU6"),
    "unsqueeze chain to N×1×C×1": (_two_unsqueezes_wrong, "N×C → N×C×1×1 needs axes [2, 3]"),
    "gate scales another tensor": (_different_tensor, "the gate scales 'other'"),
    "weight shared outside": (_shared_weight, "shared with node(s) outside the block: side_conv"),
    "intermediate consumed outside": (_intermediate_used, "consumed outside the block by Identity 'leak'"),
    "intermediate is graph output": (_intermediate_is_output, "consumed outside the block by the graph outputs"),
    "reduce over C": (_axes_over_c, "reduces axes [1, 3]"),
    "keepdims 0 into Conv": (_keepdims0_into_conv, "keepdims mismatch"),
    "unsqueeze wrong axes": (_unsqueeze_wrong_axes, "inserts axes [1, 2]"),
    "weight is a graph input": (_weight_is_input, "is not a constant (a graph input)"),
    "weight initializer overridable": (_weight_overridable, "is not a constant (a graph input)"),
    "weight computed": (_weight_computed, "is not a constant (computed by Neg 'negw')"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_miss_is_refused_with_reason(case, caplog):
    build, reason = NEAR_MISSES[case]
    model = build()
    (cand,) = find_se_blocks(model)
    assert not cand.ok and reason in cand.reason, cand.reason
    with caplog.at_level(logging.DEBUG, logger="sedeploy.passes"):
        fused, report = fuse_se_blocks(model)
    assert (report.found, report.fused) == (0, 0)
    assert len(report.refused) == 1 and reason in report.refused[0][1]
    assert report.as_dict()["refused"][0]["reason"] == report.refused[0][1]
    assert any(reason in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    assert fused.SerializeToString() == model.SerializeToString()


def test_refused_block_beside_a_fused_one():
    """A near miss does not stop the pass: in a model with one good and one bad block, only the good one
    changes."""
    good = se_model(sq="rm_attr")
    bad = _different_tensor()
    g = good.graph
    # append the bad block's nodes after the good one, chained through `out`
    rename = {"inp": "out", "out": "out2"}
    for n in bad.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(n)
        node.name = "b_" + n.name
        node.input[:] = [rename.get(i, i if i in ("",) else "b_" + i) for i in n.input]
        node.output[:] = [rename.get(o, "b_" + o) for o in n.output]
        g.node.append(node)
    for i in bad.graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(i)
        t.name = "b_" + i.name
        g.initializer.append(t)
    g.output[0].name = "out2"
    onnx.checker.check_model(good, full_check=True)
    fused, report = fuse_se_blocks(good)
    assert (report.found, report.fused, len(report.refused)) == (1, 1, 1)
    assert "the gate scales 'b_other'" in report.refused[0][1]
    x = np.random.default_rng(2).standard_normal((2, C, HW, HW)).astype(np.float32)
    assert np.abs(ort_run(good, x) - ort_run(fused, x)).max() <= TOL


def test_hard_swish_and_other_constants_are_no_candidates():
    """x * hardsigmoid(x) (hard-swish) is an activation, and Add(3) → Clip(0, 6) → Mul(0.17) is no hard sigmoid:
    neither is an SE candidate, and the graph is left as it is."""
    g = G(opset=13)
    a = g.node("Add", ["x", g.const(np.float32(3.0))])
    hswish = g.node("Mul", ["x", g.node("Div", [clip06(g, a), g.const(np.float32(6.0))])])
    assert find_se_blocks(g.model(hswish)) == []
    m = se_model(gt="hs_mul")
    mul = next(n for n in m.graph.node if n.op_type == "Mul" and n.name != "scale")
    k = next(i for i in m.graph.initializer if i.name == mul.input[0])
    k.CopyFrom(numpy_helper.from_array(np.float32(0.17), k.name))
    assert find_se_blocks(m) == []
    fused, report = fuse_se_blocks(m)
    assert (report.found, report.fused, report.refused) == (0, 0, [])
    assert fused.SerializeToString() == m.SerializeToString()


def test_foreign_model_se_blocks_fused(foreign_art):
    """The third-party-style MobileNetV3-like model (tests/foreign_model.py): all three SE blocks, each spelled
    differently, are found and fused; its hard-swish activations are not candidates; probabilities unchanged."""
    model = onnx.load(str(foreign_art.onnx_path))
    cands = find_se_blocks(model)
    assert [c.ok for c in cands] == [True, True, True], [c.reason for c in cands]
    assert {c.variant["squeeze"] for c in cands} == {"AveragePool", "ReduceMean(keepdims=0)"}
    assert {c.variant["fc"] for c in cands} == {"Conv+bias", "Gemm+bias", "MatMul+bias"}
    assert {c.variant["act"] for c in cands} == {"Relu", "Relu6"}
    for form in ("standard", "function"):
        fused, report = fuse_se_blocks(model, form=form)
        assert (report.found, report.fused, report.rewritten, report.refused) == (3, 3, 3, [])
        onnx.checker.check_model(fused, full_check=True)
        x = foreign_art.images[:4]
        from sedeploy.onnxcore import run_model

        ref, got = run_model(model, x), run_model(fused, x)
        assert ref.shape == (4, 1001) and np.allclose(ref.sum(1), 1.0, atol=1e-5)
        assert np.abs(ref - got).max() <= TOL
    assert ops(fused)["GlobalAveragePool"] == 1 and ops(fused)["AveragePool"] == 0


# ------------------------------------------------------------- spellings that need canonicalisation first


def _constant_node(g: G, arr) -> str:
    """A value as a Constant node (paddle2onnx writes every constant this way), not an initializer."""
    g.k += 1
    name = f"k{g.k}"
    g.nodes.append(helper.make_node("Constant", [], [name], name=f"Constant_{g.k}",
                                    value=numpy_helper.from_array(np.asarray(arr), name)))
    return name


def _conv_then_bias_add(g: G, v: str, cin: int, cout: int, *, relu_on_constant=False) -> str:
    """paddle2onnx's FC: Conv without bias, then Add(Reshape(Constant bias, [1, C, 1, 1]))."""
    conv = g.node("Conv", [v, _constant_node(g, (g.rng.standard_normal((cout, cin, 1, 1)) * 0.5).astype(np.float32))])
    bias = _constant_node(g, (g.rng.standard_normal(cout) * 0.5).astype(np.float32))
    if relu_on_constant:
        bias = g.node("Relu", [bias])
    shaped = g.node("Reshape", [bias, _constant_node(g, np.array([1, cout, 1, 1], np.int64))])
    return g.node("Add", [conv, shaped])


def foreign_se_model(gate_kind: str, *, identity=False, relu_on_constant=False, seed=0) -> onnx.ModelProto:
    g = G(opset=13, seed=seed)
    s = g.node("GlobalAveragePool", ["x"])
    h = g.node("Relu", [_conv_then_bias_add(g, s, C, R, relu_on_constant=relu_on_constant)])
    if identity:
        h = g.node("Identity", [h])
    z = _conv_then_bias_add(g, h, R, C)
    if gate_kind == "hardsigmoid":  # paddle's alpha 0.2, beta 0.5
        gt = g.node("HardSigmoid", [z], alpha=0.2, beta=0.5)
    elif gate_kind == "mul_add_clip":  # HardSigmoid written out with other constants: Clip(z * a + b, 0, 1)
        a = g.node("Add", [_constant_node(g, np.float32(0.45)), g.node("Mul", [z, _constant_node(g, np.float32(0.3))])])
        gt = g.node("Clip", [a, _constant_node(g, np.float32(0.0)), _constant_node(g, np.float32(1.0))])
    elif gate_kind == "div_add_clip":  # ... or with a Div by 1/alpha
        a = g.node("Add", [g.node("Div", [z, _constant_node(g, np.float32(6.0))]), _constant_node(g, np.float32(0.5))])
        gt = g.node("Clip", [a, _constant_node(g, np.float32(0.0)), _constant_node(g, np.float32(1.0))])
    else:  # Add(3) → Clip(0, 6) → Div(6)
        a = g.node("Add", [z, _constant_node(g, np.float32(3.0))])
        c = g.node("Clip", [a, _constant_node(g, np.float32(0.0)), _constant_node(g, np.float32(6.0))])
        gt = g.node("Div", [c, _constant_node(g, np.float32(6.0))])
    if identity:
        gt = g.node("Identity", [gt])
    return g.model(g.node("Mul", ["x", gt], name="scale"))


FOREIGN = [dict(gate_kind="hardsigmoid"), dict(gate_kind="hardsigmoid", identity=True, relu_on_constant=True),
           dict(gate_kind="add_clip_div", identity=True), dict(gate_kind="mul_add_clip"),
           dict(gate_kind="div_add_clip", relu_on_constant=True)]


@pytest.mark.parametrize("spelling", FOREIGN, ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()))
def test_foreign_spelling_fused_after_canonicalisation(spelling):
    """Conv bias as a separate Add, constants as Constant nodes, Identity and Relu-on-a-constant inside the chain,
    HardSigmoid with any alpha/beta or written out: canonicalise, then the one standard fused form."""
    from sedeploy.passes.canonical import canonicalize

    model = foreign_se_model(**spelling)
    onnx.checker.check_model(model, full_check=True)
    canonical, _ = canonicalize(model)
    fused, report = fuse_se_blocks(canonical)
    assert (report.found, report.fused, report.refused) == (1, 1, [])
    onnx.checker.check_model(fused, full_check=True)
    assert ops(fused) == {"Relu": 3, "GlobalAveragePool": 1, "Conv": 2, "HardSigmoid": 1, "Mul": 1}
    hs = next(n for n in fused.graph.node if n.op_type == "HardSigmoid")
    alpha = {a.name: a.f for a in hs.attribute}["alpha"]
    want = {"hardsigmoid": 0.2, "mul_add_clip": 0.3, "div_add_clip": 1 / 6, "add_clip_div": 1 / 6}
    assert np.isclose(alpha, want[spelling["gate_kind"]], rtol=1e-6)
    x = np.random.default_rng(3).standard_normal((2, C, HW, HW)).astype(np.float32)
    ref = ort_run(model, x, "disabled")
    assert np.abs(ref - ort_run(fused, x, "disabled")).max() <= TOL * max(1.0, float(np.abs(ref).max()))


def test_foreign_near_miss_refused_with_reason_after_canonicalisation(caplog):
    """A Clip(z * a + b) gate clipped to [0, 2] is not a HardSigmoid: no candidate, graph unchanged by fusion."""
    from sedeploy.passes.canonical import canonicalize

    model = foreign_se_model("mul_add_clip")
    clip = next(n for n in model.graph.node if n.op_type == "Clip")
    hi = next(n for n in model.graph.node if n.output[0] == clip.input[2])
    hi.attribute[0].t.CopyFrom(numpy_helper.from_array(np.float32(2.0), hi.output[0]))
    canonical, _ = canonicalize(model)
    fused, report = fuse_se_blocks(canonical)
    assert (report.found, report.fused) == (0, 0)
    assert fused.SerializeToString() == canonical.SerializeToString()
    # the same block with a shared FC weight: matched as a candidate, refused with the reason under -v (DEBUG)
    g = G(opset=13)
    s = g.node("GlobalAveragePool", ["x"])
    w1 = g.w(R, C, 1, 1)
    h = g.node("Relu", [g.node("Conv", [s, w1, g.w(R)])])
    gt = g.node("HardSigmoid", [g.node("Conv", [h, g.w(C, R, 1, 1), g.w(C)])], alpha=0.2, beta=0.5)
    y = g.node("Mul", ["x", gt], name="scale")
    g.extra_outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    g.nodes.append(helper.make_node("Conv", [s, w1], ["side"], name="other_user"))
    m = g.model(y)
    with caplog.at_level(logging.DEBUG, logger="sedeploy.passes"):
        _, report = fuse_se_blocks(canonicalize(m)[0])
    assert report.fused == 0 and "shared with node(s) outside the block" in report.refused[0][1]
    assert any("refused" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.slow
def test_ppocr_all_nine_se_blocks_fused(shared_data):
    """The real paddle2onnx PP-OCR text-direction classifier: 9 of 9 SE blocks fused after canonicalisation, the
    fused graph equal to the input model on its 48×192 input (pinned in a copy)."""
    from sedeploy.onnxcore import run_model
    from sedeploy.passes.canonical import canonicalize

    model = onnx.load(str(shared_data / "models" / "ppocr_textdir_cls_paddle2onnx_op13.onnx"))
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], (48, 192)):
        d.ClearField("dim_param")
        d.dim_value = v
    fused, report = fuse_se_blocks(canonicalize(model)[0])
    assert (report.found, report.fused, report.refused) == (9, 9, [])
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 48, 192)).astype(np.float32)
    ref = run_model(model, x)
    assert np.abs(ref - run_model(fused, x)).max() <= TOL
