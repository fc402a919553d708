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


def _layer_means(model, images, nodes):
    """Per-channel output means of the named nodes of ``model`` over ``images``."""
    from sedeploy.onnxcore import cpu_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {n.name: n.output[0] for n in m.graph.node}
    outs = [by_name[n] for n in nodes]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outs)
    sess = cpu_session(m)
    got = sess.run(outs, {sess.get_inputs()[0].name: images})
    return {n: a.astype(np.float64).mean(axis=(0, 2, 3)) for n, a in zip(nodes, got)}


def test_measured_bias_correction_restores_layer_means(tiny_onnx, calib, trt_int8, tmp_path):
    """The TensorRT form's default bias correction is measured on the quantized model: each corrected layer's
    per-channel output mean on the calibration images comes back to FP32's, far closer than with the weight-only
    correction (which cannot see the activation grid's shift). The head keeps the weight-only correction."""
    from sedeploy.quantize import head_layers
    from sedeploy.quantize.measured_bias import calibration_images, quantized_layers

    path, report = trt_int8
    assert report.settings["bias_correction"] == "measured"
    measured = onnx.load(str(path))
    layers = [n for n in quantized_layers(measured) if n not in head_layers(tiny_onnx)]
    assert report.settings["bias_measured_layers"] == len(layers) > 0
    weights_only = tmp_path / "w.onnx"
    assert quantize_model(tiny_onnx, calib, weights_only, flavour="trt",
                          bias_correction=True).settings["bias_correction"] is True
    images = calibration_images(calib)
    fp32 = _layer_means(onnx.load(str(tiny_onnx)), images, layers)
    residual = {}
    for name, model in (("measured", measured), ("weights", onnx.load(str(weights_only)))):
        got = _layer_means(model, images, layers)
        residual[name] = float(np.mean([np.abs(got[n] - fp32[n]).mean() for n in layers]))
    assert residual["measured"] < 0.5 * residual["weights"], residual


def test_measured_bias_correction_needs_the_images(tiny_onnx, calib, tmp_path):
    """A calibration read back from its file does not know its image folder: the measured correction says so
    (weight-only correction still works); it applies to the TensorRT flavour only."""
    from sedeploy.quantize import CalibrationResult

    loaded = CalibrationResult.load(calib.cache_path)
    with pytest.raises(SedeployError, match="image folder"):
        quantize_model(tiny_onnx, loaded, tmp_path / "a.onnx", flavour="trt")
    assert not (tmp_path / "a.onnx").exists()
    rep = quantize_model(tiny_onnx, loaded, tmp_path / "b.onnx", flavour="trt", bias_correction=True)
    assert rep.settings["bias_correction"] is True
    with pytest.raises(SedeployError, match="TensorRT flavour"):
        quantize_model(tiny_onnx, calib, tmp_path / "c.onnx", flavour="cpu", bias_correction="measured")
