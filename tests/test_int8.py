"""INT8 artifacts: both flavours from one calibration, agreement with FP32 on a trained model, TensorRT rules."""
from __future__ import annotations

import numpy as np
import pytest

from sedeploy import quantize
from sedeploy.quantize import calibrate
from sedeploy.errors import SedeployError
from sedeploy.quantize import DEFAULT_SE_POLICY, quantize_model
from sedeploy.checks import check_trt_qdq

from tiny_trained import INT8_MIN_AGREEMENT as MIN_AGREEMENT, MIN_TEST_ACCURACY


@pytest.fixture(scope="session")
def tiny(tiny_trained_art):
    return tiny_trained_art


#: the default method (mse); entropy is not used here: its threshold collapses on ReLU outputs in the uint8 CPU form
#: (the spike of exact zeros in bin 0 dominates the KL search; see test_calibration.test_entropy_keeps_relu_ranges).
METHOD = quantize.DEFAULT_METHOD


@pytest.fixture(scope="session")
def calib(tiny, tmp_path_factory):
    return calibrate(tiny.onnx_path, tiny.calib_dir, method=METHOD, progress=False, preprocess=tiny.preprocess,
                     cache_dir=tmp_path_factory.mktemp("calcache"))


@pytest.fixture(scope="session")
def artifacts(tiny, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return {(fl, se): quantize_model(tiny.onnx_path, calib, out / f"tiny_{fl}_{se}.onnx", flavour=fl, se=se)
            for fl in ("trt", "cpu") for se in ("int8", "fp32")}


def _logits(path, images):
    from sedeploy.backends.ort import OrtRunner

    with OrtRunner(path, threads=2) as r:
        return np.concatenate([r.infer(images[i:i + 100]) for i in range(0, len(images), 100)])


@pytest.mark.parametrize("flavour", ["trt", "cpu"])
@pytest.mark.parametrize("se", ["int8", "fp32"])
def test_int8_agrees_with_fp32_on_trained_model(tiny, artifacts, flavour, se):
    ref = _logits(tiny.onnx_path, tiny.images)
    assert (ref.argmax(1) == tiny.labels).mean() >= MIN_TEST_ACCURACY  # trained: agreement means something
    got = _logits(artifacts[flavour, se].path, tiny.images)
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    print(f"{flavour} se={se}: top-1 agreement {agreement:.2%} on {len(ref)} held-out images, "
          f"max |dlogit| {np.abs(got - ref).max():.3f}")
    assert agreement >= MIN_AGREEMENT
    assert 0 < np.abs(got - ref).max()  # it really is a different (quantized) computation


def test_trt_flavour_passes_validator_and_has_expected_ops(artifacts):
    rep = artifacts["trt", "int8"]
    v = check_trt_qdq(rep.path)
    assert v.ok, [str(e) for e in v.errors]
    assert not v.rules("warning"), [str(w) for w in v.warnings]
    assert rep.format == "QDQ" and rep.quantized_ops["Conv"] >= 20 and rep.quantized_ops.get("Gemm") == 1
    assert v.qdq["per_channel_dequantize"] == rep.quantized_ops["Conv"] + 1
    assert "QLinearConv" not in rep.op_histogram and "Sigmoid" not in rep.quantized_ops
    fp32_se = artifacts["trt", "fp32"]
    assert check_trt_qdq(fp32_se.path).ok
    # SE FCs (two 1×1 convs per block) stay float
    assert rep.quantized_ops["Conv"] - fp32_se.quantized_ops["Conv"] == 2 * rep.op_histogram["Sigmoid"]


def test_cpu_flavour_is_uint8_qoperator(artifacts):
    import onnx

    rep = artifacts["cpu", DEFAULT_SE_POLICY]
    assert rep.format == "QOperator" and rep.quantized_ops["QLinearConv"] >= 20
    assert "Conv" not in rep.op_histogram
    m = onnx.load(rep.path)
    assert not check_trt_qdq(m).ok  # QOperator ops: not a TensorRT artifact
    zps = {t.data_type for t in m.graph.initializer if t.name.endswith("zero_point")}
    assert onnx.TensorProto.UINT8 in zps
    full = artifacts["cpu", "int8"]
    assert full.quantized_ops.get("QLinearSigmoid") == full.op_histogram.get("QLinearSigmoid", 0) > 0
    assert "QLinearSigmoid" not in artifacts["cpu", "fp32"].quantized_ops


@pytest.mark.parametrize("flavour", ["trt", "cpu"])
def test_artifact_checked_and_metadata(artifacts, calib, flavour):
    import onnx

    rep = artifacts[flavour, "int8"]
    onnx.checker.check_model(rep.path, full_check=True)
    meta = {p.key: p.value for p in onnx.load(rep.path).metadata_props}
    assert meta["sedeploy.precision"] == "int8" and meta["sedeploy.int8_flavour"] == flavour
    assert meta["sedeploy.calibration_method"] == METHOD and meta["sedeploy.calibration_key"] == calib.key
    d = rep.as_dict()
    assert d["flavour"] == flavour and d["se"] == "int8" and d["calibration"]["key"] == calib.key


def _corrupt_and_check(path, tmp_path, edit):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    edit(m, numpy_helper)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    return check_trt_qdq(bad)


def test_corrupted_trt_flavour_fails_validator(artifacts, tmp_path):
    path = artifacts["trt", "int8"].path

    def nonzero_zp(m, nh):
        t = next(t for t in m.graph.initializer if t.name == "sedeploy_zp_int8")
        t.CopyFrom(nh.from_array(np.array(3, np.int8), t.name))

    def int32_bias(m, nh):
        conv = next(n for n in m.graph.node if n.op_type == "Conv" and len(n.input) == 3)
        bias = next(t for t in m.graph.initializer if t.name == conv.input[2])
        b = nh.to_array(bias)
        m.graph.initializer.extend([nh.from_array(np.round(b * 100).astype(np.int32), "b_i32"),
                                    nh.from_array(np.array(0.01, np.float32), "b_scale")])
        m.graph.node.insert(0, __import__("onnx").helper.make_node("DequantizeLinear", ["b_i32", "b_scale"],
                                                                    ["b_dq"]))
        conv.input[2] = "b_dq"

    assert "zero-point-nonzero" in _corrupt_and_check(path, tmp_path, nonzero_zp).rules("error")
    assert "int32-dequantize" in _corrupt_and_check(path, tmp_path, int32_bias).rules("error")


def test_refuses_non_fp32_model_and_foreign_calibration(tiny, artifacts, calib, tiny_onnx, tmp_path):
    with pytest.raises(SedeployError, match="not an FP32 model"):
        quantize_model(artifacts["trt", "int8"].path, calib, tmp_path / "x.onnx", flavour="trt")
    foreign = calib.__class__(**{**calib.__dict__, "ranges": {"input": (-2.0, 2.0)}})
    for flavour in ("trt", "cpu"):
        with pytest.raises(SedeployError, match="has no range for"):
            quantize_model(tiny.onnx_path, foreign, tmp_path / "x.onnx", flavour=flavour)
    with pytest.raises(SedeployError, match="Unknown INT8 flavour"):
        quantize_model(tiny.onnx_path, calib, tmp_path / "x.onnx", flavour="gpu")
    with pytest.raises(SedeployError, match="Unknown SE precision"):
        quantize_model(tiny.onnx_path, calib, tmp_path / "x.onnx", flavour="cpu", se="fp16")
    assert not (tmp_path / "x.onnx").exists()


def test_atomic_write_leaves_nothing_on_failure(tiny, calib, tmp_path, monkeypatch):
    import onnx

    def boom(*a, **k):
        raise onnx.checker.ValidationError("injected failure")

    monkeypatch.setattr(onnx.checker, "check_model", boom)
    out = tmp_path / "out.onnx"
    with pytest.raises(onnx.checker.ValidationError):
        quantize_model(tiny.onnx_path, calib, out, flavour="trt")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flavour", ["trt", "cpu", "ov"])
def test_head_policy(tiny, calib, tmp_path, flavour):
    """head="float" (the CPU/OpenVINO default) keeps the classifier Gemm — and, in the CPU/OpenVINO forms, the ops
    rounding its input — out of INT8; head="int8" quantizes it. Everything else is quantized the same way."""
    import onnx

    from sedeploy import quantize
    from sedeploy.onnxcore import Graph

    heads = quantize.head_layers(tiny.onnx_path)
    assert len(heads) == 1
    reps = {h: quantize_model(tiny.onnx_path, calib, tmp_path / f"{h}.onnx", flavour=flavour, head=h)
            for h in quantize.HEAD_POLICIES}
    assert quantize.DEFAULT_HEAD_POLICY == {"cpu": "float", "ov": "float", "trt": "int8"}
    for h, rep in reps.items():
        g = Graph(onnx.load(rep.path))
        gemm = [n for n in g.nodes if n.op_type in ("Gemm", "QGemm")]
        quantized = bool(gemm) and (gemm[0].op_type == "QGemm" or g.made_by(gemm[0].input[1], "DequantizeLinear")
                                    is not None)
        assert quantized == (h == "int8"), (h, [n.op_type for n in gemm])
        assert rep.settings["head"]["policy"] == h
        assert rep.settings["head"]["layers"] == (heads if h == "float" else [])
        if flavour == "trt":
            assert check_trt_qdq(rep.path).ok
    assert heads[0] in reps["float"].settings["head"]["float_nodes"]
    conv = {h: r.quantized_ops.get("Conv", 0) + r.quantized_ops.get("QLinearConv", 0) for h, r in reps.items()}
    assert conv["float"] == conv["int8"] > 0
    assert quantize.float_head_layers(tiny.onnx_path, flavour) == (heads if flavour != "trt" else [])
    with pytest.raises(SedeployError, match="head precision policy"):
        quantize_model(tiny.onnx_path, calib, tmp_path / "bad.onnx", flavour=flavour, head="fp8")
    assert not (tmp_path / "bad.onnx").exists()


def test_trt_form_smoke_run_sees_an_fp16_overflow(tmp_path):
    """The TensorRT form is Q/DQ inside the FP16 graph. ORT's CPU provider computes its FP16 parts in FP32, so the
    smoke run also goes through the FP16 emulation: an activation past 65504 must stop the file being published."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxconverter_common import float16

    from sedeploy.errors import VerificationError
    from sedeploy.quantize import smoke_run

    w = numpy_helper.from_array(np.full((4, 3, 3, 3), 3000.0, np.float32), "w")  # fits FP16; its output does not
    k = numpy_helper.from_array(np.full((1, 4, 1, 1), 1e-4, np.float32), "k")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["c", "k"], ["m"]),
             helper.make_node("GlobalAveragePool", ["m"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, k])
    path = tmp_path / "big.fp16.onnx"
    onnx.save(float16.convert_float_to_float16(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                                               keep_io_types=True), str(path))
    smoke_run(path, "big")  # run as ORT's CPU provider runs it: FP32 arithmetic, finite
    with pytest.raises(VerificationError, match=r"tensor\(s\) overflow FP16.*'c'"):
        smoke_run(path, "big", fp16=True)


# ------------------------------------------------------------------------------- bounded ReLU (Clip) and depthwise
def _clip_net(path, clip_lo: float = 0.0, seed: int = 0):
    """x → Conv 3→8 → Clip(clip_lo, 6) → depthwise Conv (group 8) → Clip(0, 6) → 1×1 Conv 8→16 → Clip(0, 6) →
    GlobalAveragePool → Flatten → Gemm 16→10: a MobileNet-style network at 32×32 whose pre-activation ranges are
    several times the Clip's (weights scaled up), so rounding a Conv output on its own range shows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in {
        "w0": rng.normal(0, 1.0, (8, 3, 3, 3)), "b0": rng.normal(0, 1.0, 8),
        "w1": rng.normal(0, 1.5, (8, 1, 3, 3)), "b1": rng.normal(0, 1.0, 8),
        "w2": rng.normal(0, 1.0, (16, 8, 1, 1)), "b2": rng.normal(0, 1.0, 16),
        "wf": rng.normal(0, 0.5, (10, 16)), "bf": rng.normal(0, 0.1, 10),
        "lo": np.array(clip_lo), "zero": np.array(0.0), "six": np.array(6.0)}.items()]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Clip", ["c0", "lo", "six"], ["r0"], name="clip0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], group=8, name="dw"),
             helper.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="clip1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="pw"),
             helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="clip2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "clipnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.fixture(scope="module")
def clip_images(tmp_path_factory):
    """24 smooth random RGB images (37 px: the 32-px pipeline only centre-crops them) and their input arrays."""
    from PIL import Image

    from sedeploy.preprocess import Preprocess, load_folder

    folder = tmp_path_factory.mktemp("clip-calib")
    rng = np.random.default_rng(5)
    for i in range(24):
        small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((37, 37), Image.BICUBIC).save(folder / f"{i:02d}.png")
    pp = Preprocess.for_size(32)
    return folder, pp, load_folder(folder, pp)[0]


def _rel_err(path, ref, x):
    from sedeploy.onnxcore import run_model

    return float(np.linalg.norm(run_model(path, x) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("flavour", ["ov", "cpu"])
def test_bounded_relu_is_quantized_like_relu(clip_images, tmp_path, flavour):
    """A Clip(0, 6) after a Conv (ReLU6) is folded into the Conv's output quantization, as a Relu is: the Conv output
    is rounded once, on the Clip's non-negative range (uint8, zero point 0), not first on its own wide signed
    pre-activation range. Measured: closer to FP32 than the same network with the Clip left out of the quantized
    ops (which rounds twice, the first time coarsely)."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    from sedeploy import quantize
    from sedeploy.onnxcore import run_model

    folder, pp, x = clip_images
    fp32 = _clip_net(tmp_path / "clip.onnx")
    cal = calibrate(fp32, folder, progress=False, preprocess=pp, cache_dir=tmp_path / "cal")
    assert cal.ranges["c1"][0] < -6 or cal.ranges["c1"][1] > 12  # the pre-activation range is much wider than 6
    ref = run_model(fp32, x)
    rep = quantize_model(fp32, cal, tmp_path / "q.onnx", flavour=flavour, head="int8")
    assert "Clip" not in rep.op_histogram and rep.settings["float_clips"] == []
    m = onnx.load(rep.path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    if flavour == "ov":
        conv_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"
                  and getattr(producer.get(n.input[0]), "op_type", None) == "Conv"]
        assert len(conv_q) == 3
        for q in conv_q:  # on the Clip's range: uint8 from zero, at most 6
            zp, scale = inits[q.input[2]], float(inits[q.input[1]])
            assert zp.dtype == np.uint8 and int(zp) == 0 and 0 < scale * 255 <= 6 + 1e-5
    else:
        assert rep.quantized_ops["QLinearConv"] == 3
    base = quantize.OV_OPTIONS if flavour == "ov" else quantize.CPU_OPTIONS
    without = dataclasses.replace(base, extra_ops=tuple(o for o in base.extra_ops if o != "Clip"))
    rep2 = quantize_model(fp32, cal, tmp_path / "q2.onnx", flavour=flavour, head="int8", cpu_options=without)
    assert rep2.op_histogram["Clip"] == 3
    err, err_without = _rel_err(rep.path, ref, x), _rel_err(rep2.path, ref, x)
    print(f"{flavour}: relative output error {err:.4f} with the Clip folded, {err_without:.4f} without")
    assert err < 0.1 and err < err_without


@pytest.mark.parametrize("flavour", ["ov", "cpu"])
def test_clip_with_other_lower_bound_stays_float(clip_images, tmp_path, flavour):
    """Only a lower bound of 0 is what a uint8 grid from zero clips exactly; a Clip(-1, 6) keeps its float node
    (the quantizer would otherwise drop it and let a symmetric signed grid pass values below -1)."""
    import onnx

    from sedeploy.onnxcore import run_model

    folder, pp, x = clip_images
    fp32 = _clip_net(tmp_path / "clip.onnx", clip_lo=-1.0)
    cal = calibrate(fp32, folder, progress=False, preprocess=pp, cache_dir=tmp_path / "cal")
    rep = quantize_model(fp32, cal, tmp_path / "q.onnx", flavour=flavour, head="int8")
    assert rep.settings["float_clips"] == ["clip0"] and rep.op_histogram["Clip"] == 1
    clip = next(n for n in onnx.load(rep.path).graph.node if n.op_type == "Clip")
    lo = next(t for t in onnx.load(rep.path).graph.initializer if t.name == clip.input[1])
    assert float(onnx.numpy_helper.to_array(lo)) == -1.0
    err = _rel_err(rep.path, run_model(fp32, x), x)
    print(f"{flavour}: relative output error {err:.4f}")
    assert err < 0.1


def test_openvino_form_uses_seven_bit_weights_and_bias_correction(clip_images, tmp_path):
    """The OpenVINO form's weights span [-64, 64] (7 bits: no int16 overflow in the u8·s8 pair sums of CPUs without
    VNNI) with each output channel's largest weight on ±64, and its biases are corrected by default."""
    import onnx
    from onnx import numpy_helper

    folder, pp, x = clip_images
    fp32 = _clip_net(tmp_path / "clip.onnx")
    cal = calibrate(fp32, folder, progress=False, preprocess=pp, cache_dir=tmp_path / "cal")
    rep = quantize_model(fp32, cal, tmp_path / "q.onnx", flavour="ov", head="int8")
    assert rep.settings["bias_correction"] and rep.settings["bias_corrected_layers"] == 4
    m = onnx.load(rep.path)
    weights = [numpy_helper.to_array(t) for t in m.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) == 4  # three Convs (one depthwise) and the Gemm
    for w in weights:
        per_channel = np.abs(w.reshape(w.shape[0], -1).astype(int)).max(1)
        assert per_channel.max() <= 64 and (per_channel == 64).all()


def _mixed_net(path, seed: int = 0):
    """x → conv_img → Relu → conv_relu → Clip(0, 6) → conv_relu6 → conv_signed (reads conv_relu6's raw, signed
    output) → Relu → GlobalAveragePool → Flatten → Gemm: one weighted layer behind each kind of input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in {
        "w0": rng.normal(0, 0.5, (8, 3, 3, 3)), "w1": rng.normal(0, 0.3, (8, 8, 3, 3)),
        "w2": rng.normal(0, 0.3, (8, 8, 1, 1)), "w3": rng.normal(0, 0.3, (8, 8, 1, 1)),
        "wf": rng.normal(0, 0.5, (10, 8)), "zero": np.array(0.0), "six": np.array(6.0)}.items()]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv_img"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv_relu"),
             helper.make_node("Clip", ["c1", "zero", "six"], ["r1"], name="relu6"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_relu6"),
             helper.make_node("Conv", ["c2", "w3"], ["c3"], name="conv_signed"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_dense_inputs_get_seven_bit_weights(clip_images, tmp_path):
    """reduce_range="dense-inputs": 7-bit weights exactly where the layer's input fills the 8-bit grid (the image,
    a ReLU6 output, a signed tensor), full 8 bits after a plain ReLU; each weight still per channel (its largest
    value on the layer's top level), the file passes onnx's full check and stays close to FP32."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    from sedeploy import quantize
    from sedeploy.onnxcore import run_model

    folder, pp, x = clip_images
    fp32 = _mixed_net(tmp_path / "mixed.onnx")
    cal = calibrate(fp32, folder, progress=False, preprocess=pp, cache_dir=tmp_path / "cal")
    seven = quantize.seven_bit_layers(onnx.load(str(fp32)), cal, "dense-inputs")
    assert seven == {"conv_img", "conv_relu6", "conv_signed"}, seven
    opts = dataclasses.replace(quantize.OV_OPTIONS, reduce_range="dense-inputs")
    rep = quantize_model(fp32, cal, tmp_path / "q.onnx", flavour="ov", head="int8", cpu_options=opts)
    assert rep.settings["seven_bit_weight_layers"] == 3
    m = onnx.load(rep.path)
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    levels = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            dq = next(p for p in m.graph.node if n.input[1] in p.output)
            w = inits[dq.input[0]].astype(int)
            assert dq.input[1] in inits and inits[dq.input[1]].size == w.shape[0]  # per output channel
            levels[n.name] = int(np.abs(w).max())
    assert levels == {"conv_img": 64, "conv_relu": 127, "conv_relu6": 64, "conv_signed": 64, "fc": 127}, levels
    ref, got = run_model(fp32, x), run_model(rep.path, x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    with pytest.raises(SedeployError, match="QDQ"):
        quantize.CpuOptions(reduce_range="dense-inputs")  # QOperator default format
    with pytest.raises(SedeployError, match="reduce_range"):
        quantize.CpuOptions(format="qdq", reduce_range="some")


def test_float_head_only_while_cheap(tmp_path):
    """head="float" keeps a head in float only while it is a small share of the multiply-adds: a classifier ending
    in a 1×1 conv on the full map (as SqueezeNet does) is quantized, a Gemm head stays float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sedeploy import quantize

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
             for n, s in {"w0": (16, 3, 3, 3), "w1": (100, 16, 1, 1)}.items()]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv_head"),
             helper.make_node("GlobalAveragePool", ["c1"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    g = helper.make_graph(nodes, "convhead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])], inits)
    path = tmp_path / "convhead.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    macs = quantize.layer_macs(path)
    assert macs["conv_head"] / sum(macs.values()) > quantize.FLOAT_HEAD_MAX_MACS_SHARE
    assert quantize.head_layers(path) == ["conv_head"]
    assert quantize.float_head_layers(path, "ov") == []
    assert quantize.float_head_layers(path, "ov", "int8") == []
    mixed = _mixed_net(tmp_path / "mixed.onnx")  # its Gemm head: a tiny share
    assert quantize.float_head_layers(mixed, "ov") == ["fc"]


def test_openvino_form_concatenates_on_one_shared_range(clip_images, tmp_path):
    """The OpenVINO form quantizes a Concat with its inputs and output on one range (the union of theirs), so the
    runtime concatenates int8 tensors as they are: every Q/DQ of those tensors carries the same scale and zero
    point, the ranges of other tensors are untouched, and the result stays close to FP32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sedeploy import quantize
    from sedeploy.onnxcore import run_model

    folder, pp, x = clip_images
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), n) for n, s, shape in (
        ("w0", 0.5, (8, 3, 3, 3)), ("wa", 0.3, (4, 8, 1, 1)), ("wb", 1.5, (4, 8, 3, 3)), ("wc", 0.3, (6, 8, 1, 1)),
        ("wf", 0.5, (10, 6)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "wa"], ["ca"], name="expand1x1"),
             helper.make_node("Relu", ["ca"], ["ra"], name="relua"),
             helper.make_node("Conv", ["r0", "wb"], ["cb"], pads=[1, 1, 1, 1], name="expand3x3"),
             helper.make_node("Relu", ["cb"], ["rb"], name="relub"),
             helper.make_node("Concat", ["ra", "rb"], ["cat"], axis=1, name="concat"),
             helper.make_node("MaxPool", ["cat"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["mp", "wc"], ["cc"], name="conv_after"),
             helper.make_node("Relu", ["cc"], ["rc"], name="reluc"),
             helper.make_node("GlobalAveragePool", ["rc"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "fire", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    fp32 = tmp_path / "fire.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(fp32))
    cal = calibrate(fp32, folder, progress=False, preprocess=pp, cache_dir=tmp_path / "cal")
    assert cal.ranges["ra"][1] != cal.ranges["rb"][1]  # the branches differ, so sharing is a real change
    unified = quantize.unify_concat_ranges(onnx.load(str(fp32)), cal)
    span = (min(cal.ranges[t][0] for t in ("ra", "rb", "cat")), max(cal.ranges[t][1] for t in ("ra", "rb", "cat")))
    assert all(unified.ranges[t] == span for t in ("ra", "rb", "cat"))
    assert unified.ranges["r0"] == cal.ranges["r0"] and cal.ranges["ra"] != span  # nothing else, no in-place edit
    rep = quantize_model(fp32, cal, tmp_path / "q.onnx", flavour="ov")
    m = onnx.load(rep.path)
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    params = {(float(inits[n.input[1]]), int(inits[n.input[2]])) for n in m.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] in ("ra", "rb", "cat", "mp")}
    assert len(params) == 1, params
    assert any(n.op_type == "Concat" for n in m.graph.node)
    ref, got = run_model(fp32, x), run_model(rep.path, x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_budget_search_stops_while_a_layer_is_int8(clip_images, tmp_path):
    """In the CPU form a layer falls back to float together with the layer feeding it, so in a chain (the
    MobileNet-style clip net) two of its three layers already cover all three: an unreachable budget ends in the
    budget's own verdict, never in the quantizer's "quantized no operator", and writes nothing."""
    import dataclasses

    from sedeploy import quantize
    from sedeploy.errors import VerificationError
    from sedeploy.int8_budget import Budget, quantize_to_budget

    folder, pp, x = clip_images
    fp32 = _clip_net(tmp_path / "clip.onnx")
    cal = calibrate(fp32, folder, progress=False, preprocess=pp, cache_dir=tmp_path / "cal")
    layers = [n for n in quantize.weighted_layers(fp32) if n not in quantize.float_head_layers(fp32, "cpu")]
    groups = quantize.float_groups(fp32, layers, "cpu")
    assert any(set(layers) <= set(groups[a]) | set(groups[b]) for a in layers for b in layers if a != b)
    broken = dataclasses.replace(cal, ranges={k: (lo / 50, hi / 50) for k, (lo, hi) in cal.ranges.items()},
                                 uint8_ranges={k: (lo / 50, hi / 50) for k, (lo, hi) in cal.uint8_ranges.items()})
    out = tmp_path / "q.onnx"
    with pytest.raises(VerificationError, match="cannot meet the budget") as err:
        quantize_to_budget(fp32, broken, out, flavour="cpu", images=x, budget=Budget(min_agreement=100.0),
                           time_speed=False)
    assert "quantized no operator" not in str(err.value) and not out.exists()


def test_seven_bit_layers_read_the_graph_not_its_listing(tmp_path):
    """An old-IR graph lists its initializers among the inputs: that makes no layer "fed by the model input"; a
    weight shared by an 8-bit and a 7-bit layer is quantized once, so both get 7 bits; and a Concat that reads a
    model input keeps its ranges (the input's other readers would change)."""
    import onnx
    from onnx import helper

    from sedeploy import quantize
    from sedeploy.quantize import CalibrationResult

    model = onnx.load(str(_mixed_net(tmp_path / "mixed.onnx")))
    ranges = {"x": (-2.0, 2.0), "c0": (-3.0, 3.0), "r0": (0.0, 3.0), "c1": (-4.0, 4.0), "r1": (0.0, 6.0),
              "c2": (-1.0, 1.0), "c3": (-1.0, 1.0), "r3": (0.0, 1.0)}
    cal = CalibrationResult(ranges=ranges, method="minmax", params={}, images=[], key="k", cache_hit=False,
                            seconds=0.0)
    want = {"conv_img", "conv_relu6", "conv_signed"}
    assert quantize.seven_bit_layers(model, cal, "dense-inputs") == want
    old_ir = onnx.load(str(tmp_path / "mixed.onnx"))
    old_ir.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in old_ir.graph.initializer)
    listed = quantize.seven_bit_layers(old_ir, cal, "dense-inputs")  # (an input-listed Clip bound is not constant)
    assert "conv_img" in listed and "conv_relu" not in listed and listed <= want
    shared = onnx.load(str(tmp_path / "mixed.onnx"))
    node = {n.name: n for n in shared.graph.node}
    node["conv_relu6"].input[1] = "w1"  # conv_relu's 3×3 weight, shape-compatible with a 3×3 conv here
    node["conv_relu6"].attribute.extend([helper.make_attribute("pads", [1, 1, 1, 1])])
    assert quantize.seven_bit_layers(shared, cal, "dense-inputs") == want | {"conv_relu"}
    cat = helper.make_node("Concat", ["x", "r0"], ["cat"], axis=1, name="cat")
    model.graph.node.append(cat)
    wide = CalibrationResult(ranges={**ranges, "cat": (-2.0, 3.0)}, method="minmax", params={}, images=[], key="k",
                             cache_hit=False, seconds=0.0)
    assert quantize.unify_concat_ranges(model, wide).ranges == wide.ranges
