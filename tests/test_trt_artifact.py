"""The TensorRT INT8 artifact (Q/DQ inside the FP16 graph) and the strong-typing check that proves its types."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

from sedeploy.checks import check_strong_typing, format_inspection, inspect_model
from sedeploy.errors import SedeployError
from sedeploy.quantize import FP16_MIN_NORMAL, TRT_OPSET, quantize_model
from sedeploy.onnxcore import Graph, default_opset


@pytest.fixture(scope="module")
def calib(tiny_onnx, calib_dir, tmp_path_factory):
    from sedeploy.quantize import calibrate
    from sedeploy.preprocess import Preprocess

    return calibrate(tiny_onnx, calib_dir, method="percentile", progress=False,
                     cache_dir=tmp_path_factory.mktemp("cc"), preprocess=Preprocess(size=32, resize_short=36))


@pytest.fixture(scope="module")
def trt_int8(tiny_onnx, calib, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "tiny.int8-trt.onnx"
    return path, quantize_model(tiny_onnx, calib, path, flavour="trt")


def test_trt_artifact_is_fp16_with_float16_scales(tiny_onnx, trt_int8):
    path, report = trt_int8
    model = onnx.load(str(path))
    g = Graph(model)
    assert default_opset(model) >= TRT_OPSET
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [1, 1]
    casts = [n for n in g.nodes if n.op_type == "Cast"]
    assert len(casts) == 2  # only the boundary: FP32 input → FP16, FP16 logits → FP32
    qdq = [n for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    scales = [g.const(n.input[1]) for n in qdq]
    assert all(s.dtype == np.float16 for s in scales)
    assert min(float(s.min()) for s in scales) >= FP16_MIN_NORMAL
    zps = [g.const(n.input[2]) for n in qdq]
    assert all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric int8
    weights = [n for n in g.nodes if n.op_type == "DequantizeLinear" and g.is_const(n.input[0])]
    assert all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in weights if n.attribute)
    assert report.quantized_ops == {"Conv": 36, "Gemm": 1}
    st = report.settings["strong_typing"]
    assert st["ok"] and st["fp32_compute_ops"] == 0 and set(st["compute_ops"]) == {"fp16"}
    # no Q/DQ on Sigmoid / pools; every Conv/Gemm data input quantized
    for n in g.nodes:
        if n.op_type in ("Sigmoid", "ReduceMean", "MaxPool", "GlobalAveragePool"):
            assert not g.made_by(n.input[0], "DequantizeLinear"), n.name
        if n.op_type in ("Conv", "Gemm"):
            assert g.made_by(n.input[0], "DequantizeLinear") and g.made_by(n.input[1], "DequantizeLinear")


def test_trt_artifact_runs_close_to_fp32_on_ort(tiny_onnx, trt_int8, calib_dir):
    """On the images it was calibrated on (ranges hold), the INT8 artifact tracks FP32 closely on average.
    (Agreement on a trained model: tests/test_int8.py.)"""
    from sedeploy.onnxcore import run_model
    from sedeploy.preprocess import Preprocess, load_folder

    x, _ = load_folder(calib_dir, Preprocess(size=32, resize_short=36))
    ref, got = run_model(tiny_onnx, x), run_model(trt_int8[0], x)
    rel = np.abs(got - ref).mean() / np.abs(ref).mean()
    print(f"mean |Δ| / mean |logit| = {rel:.3f}")
    assert 0 < rel < 0.1


def test_keep_fp32_policy_is_the_fp16_artifacts(tiny_onnx, calib, tmp_path):
    rep = quantize_model(tiny_onnx, calib, tmp_path / "q.onnx", flavour="trt", keep_fp32="se")
    st = rep.settings["strong_typing"]
    assert st["ok"] and st["compute_ops"]["fp32"] == rep.settings["kept_fp32_nodes"] > 0
    assert rep.settings["scale_types"].get("float32", 0) > 0  # Q/DQ inside the kept FP32 SE convs: float32 scales
    assert rep.quantized_ops == {"Conv": 36, "Gemm": 1}
    with pytest.raises(SedeployError, match="TensorRT flavour only"):
        quantize_model(tiny_onnx, calib, tmp_path / "c.onnx", flavour="cpu", keep_fp32="se")


def test_exclude_keeps_nodes_unquantized_in_fp16(tiny_onnx, calib, tmp_path):
    model = onnx.load(str(tiny_onnx))
    from sedeploy.onnxcore import name_nodes

    name_nodes(model)
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    rep = quantize_model(tiny_onnx, calib, tmp_path / "q.onnx", flavour="trt", exclude={conv})
    assert rep.quantized_ops == {"Conv": 35, "Gemm": 1} and rep.settings["excluded_nodes"] == [conv]
    g = Graph(onnx.load(str(tmp_path / "q.onnx")))
    node = next(n for n in g.nodes if n.name == conv)
    assert not g.made_by(node.input[1], "DequantizeLinear") and g.dtype[node.input[1]] == onnx.TensorProto.FLOAT16
    cpu = quantize_model(tiny_onnx, calib, tmp_path / "c.onnx", flavour="cpu", exclude=[conv])
    head = set(cpu.settings["head"]["float_nodes"])  # the CPU form's classifier head stays float by default
    assert set(cpu.settings["excluded_nodes"]) - head == {conv} and cpu.settings["excluded_se_nodes"] == 0
    with pytest.raises(SedeployError, match="does not have"):
        quantize_model(tiny_onnx, calib, tmp_path / "x.onnx", flavour="trt", exclude={"no-such-node"})
    with pytest.raises(SedeployError, match="collection of node names"):
        quantize_model(tiny_onnx, calib, tmp_path / "x.onnx", flavour="trt", exclude=conv)
    assert not (tmp_path / "x.onnx").exists()


def test_strong_typing_counts_fp32_ops_per_artifact(tiny_onnx, trt_int8, tmp_path):
    from sedeploy.fp16 import convert_fp16

    fp32 = check_strong_typing(tiny_onnx)
    assert fp32.ok and set(fp32.compute_ops) == {"fp32"} and len(fp32.fp32_ops) == fp32.compute_ops["fp32"] > 50
    rep = convert_fp16(tiny_onnx, tmp_path / "t.fp16.onnx")
    assert rep.strong_typing["ok"] and rep.strong_typing["fp32_compute_ops"] == 0 and rep.strong_typing["casts"] == 2
    d = inspect_model(trt_int8[0])
    assert d["ok"] and d["strong_typing"]["compute_ops"] == {"fp16": fp32.compute_ops["fp32"]}
    assert "Strong typing (TensorRT's parser): OK; compute ops typed fp16" in format_inspection(d)


def test_fp32_scale_in_fp16_graph_fails_naming_the_node(trt_int8, tmp_path):
    model = onnx.load(str(trt_int8[0]))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    scale = next(t for t in model.graph.initializer if t.name == q.input[1])
    scale.CopyFrom(nh.from_array(nh.to_array(scale).astype(np.float32), scale.name))
    report = check_strong_typing(model)
    assert not report.ok and {v.rule for v in report.errors} == {"strong-typing-scale"}
    assert any(f"QuantizeLinear '{q.name}'" == v.node for v in report.errors)
    assert any("because DequantizeLinear" in v.found and "fp32 scale" in v.found for v in report.errors)
    d = inspect_model(model)
    assert not d["ok"] and "FAILED" in format_inspection(d)
