"""Inputs as users have them: NHWC models, non-square and dynamic H/W, BGR and padded text-line preprocessing,
EXIF orientation, and the guards against inputs that would exhaust memory."""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from sedeploy.errors import SedeployError


def _classifier(shape, *, nhwc=False, converter_transpose=True, seed=0):
    """A tiny random-weight classifier: Conv(3→8, 3×3) → Relu → GlobalAveragePool → Flatten → Gemm(8→5).
    ``nhwc``: the input is N×H×W×3, turned to NCHW by a leading Transpose (as tf2onnx writes it), or, with
    ``converter_transpose=False``, by a channels-last Mul first (so no Transpose can simply be dropped)."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
             nh.from_array(rng.normal(size=(5, 8)).astype(np.float32), "fc"),
             nh.from_array(rng.normal(size=(3,)).astype(np.float32), "scale")]
    nodes = []
    first = "x"
    if nhwc:
        if not converter_transpose:
            nodes.append(h.make_node("Mul", ["x", "scale"], ["xs"]))  # per-channel scale, channels last
            first = "xs"
        nodes.append(h.make_node("Transpose", [first], ["xt"], perm=[0, 3, 1, 2]))
        first = "xt"
    nodes += [h.make_node("Conv", [first, "w"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["r"]),
              h.make_node("GlobalAveragePool", ["r"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
              h.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    g = h.make_graph(nodes, "m", [h.make_tensor_value_info("x", TP.FLOAT, list(shape))],
                     [h.make_tensor_value_info("y", TP.FLOAT, [shape[0], 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


# ---------------------------------------------------------------------------------------------- input description
def test_image_input_reads_layout_non_square_and_dynamic_sizes():
    from sedeploy.onnxcore import image_input

    nchw = image_input(_classifier([1, 3, 32, 48]))
    assert (nchw.layout, nchw.height, nchw.width) == ("NCHW", 32, 48)
    nhwc = image_input(_classifier([1, 32, 48, 3], nhwc=True))
    assert (nhwc.layout, nhwc.channels, nhwc.height, nhwc.width) == ("NHWC", 3, 32, 48)
    dyn = _classifier(["N", 3, "H", "W"])
    with pytest.raises(SedeployError, match="dynamic") as err:
        image_input(dyn, path="dyn.onnx")
    assert "--input-shape" in err.value.fix and "sedeploy export" not in err.value.fix
    free = image_input(dyn, dynamic_hw=True)
    assert free.dynamic_hw and free.layout == "NCHW"
    with pytest.raises(SedeployError, match="holds the channels"):
        image_input(_classifier([1, 4, 32, 32]))


@pytest.mark.parametrize("converter_transpose", [True, False])
def test_nchw_input_computes_what_the_nhwc_model_computes(converter_transpose):
    from sedeploy.onnxcore import image_input, nchw_input, run_model

    src = _classifier([2, 16, 24, 3], nhwc=True, converter_transpose=converter_transpose)
    out, how = nchw_input(src)
    inp = image_input(out)
    assert (inp.layout, inp.name, inp.height, inp.width) == ("NCHW", "x", 16, 24)
    transposes = sum(n.op_type == "Transpose" for n in out.graph.node)
    assert transposes == (0 if converter_transpose else 2), how  # dropped, or one added in front of the Mul
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 16, 24)).astype(np.float32)
    np.testing.assert_allclose(run_model(out, x), run_model(src, np.ascontiguousarray(x.transpose(0, 2, 3, 1))),
                               rtol=1e-6, atol=1e-6)
    assert image_input(src).layout == "NHWC"  # the caller's model is untouched


def test_pin_image_size_fixes_dynamic_hw_and_refuses_a_contradiction():
    from sedeploy.onnxcore import image_input, pin_image_size, run_model

    dyn = _classifier(["N", 3, "H", "W"])
    pinned = pin_image_size(dyn, 20, 36)
    inp = image_input(pinned)
    assert (inp.height, inp.width, inp.dynamic_batch) == (20, 36, True)
    inner = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pinned.graph.value_info}
    assert inner["c"] == [0, 8, 20, 36]  # shapes inferred again from the pinned input (batch stays symbolic)
    x = np.random.default_rng(2).normal(size=(3, 3, 20, 36)).astype(np.float32)
    np.testing.assert_array_equal(run_model(pinned, x), run_model(dyn, x))
    half = _classifier(["N", 3, 20, "W"])
    with pytest.raises(SedeployError, match="fixed height of 20"):
        pin_image_size(half, 24, 36)


def test_a_size_the_graph_contradicts_is_refused_when_pinned():
    """Shape inference accepts a Reshape to a fixed length at any size; the one run after pinning does not."""
    from sedeploy.onnxcore import pin_image_size

    w = nh.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("Reshape", ["c", "shp"], ["r"]),
             h.make_node("MatMul", ["r", "fc"], ["y"])]
    g = h.make_graph(nodes, "m", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, "H", "W"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, 5])],
                     [w, nh.from_array(np.array([1, 64], np.int64), "shp"),
                      nh.from_array(np.ones((64, 5), np.float32), "fc")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    assert pin_image_size(m, 4, 4) is not None  # 4·4·4 = 64: the size the graph was made for
    with pytest.raises(SedeployError, match="cannot run at --input-shape 8x8") as err:
        pin_image_size(m, 8, 8)
    assert "reshape" in str(err.value).lower()


def test_a_dynamic_nhwc_model_is_pinned_then_made_nchw(tmp_path):
    from sedeploy.onnxcore import image_input, nchw_input, pin_image_size, run_model

    src = _classifier(["N", "H", "W", 3], nhwc=True)
    assert image_input(src, dynamic_hw=True).layout == "NHWC"
    out, how = nchw_input(pin_image_size(src, 12, 20))
    inp = image_input(out)
    assert (inp.layout, inp.height, inp.width) == ("NCHW", 12, 20) and "dropped" in how
    x = np.random.default_rng(3).normal(size=(2, 3, 12, 20)).astype(np.float32)
    np.testing.assert_allclose(run_model(out, x), run_model(src, np.ascontiguousarray(x.transpose(0, 2, 3, 1))),
                               rtol=1e-5, atol=1e-6)


def test_input_memory_is_checked_before_any_work(tmp_path):
    from sedeploy.cli import cli

    huge = tmp_path / "huge.onnx"
    onnx.save(_classifier(["N", 3, 40000, 40000]), str(huge))
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["build-engine", str(huge), "--backend", "ort", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "GiB" in r.output and "available" in r.output, r.output
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "out").exists()
    dyn = tmp_path / "dyn.onnx"
    onnx.save(_classifier(["N", 3, "H", "W"]), str(dyn))
    r = CliRunner().invoke(cli, ["build-engine", str(dyn), "--input-shape", "40000x40000", "--backend", "ort",
                                 "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--input-shape" in r.output and "GiB" in r.output, r.output


# ---------------------------------------------------------------------------------------------- preprocessing
def _png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def test_non_square_crop_covers_the_crop_and_centres_it(tmp_path):
    from sedeploy.preprocess import Preprocess, load_image

    # a 100×100 image, left half black, right half white: a 32×64 crop (resize 64 → scale 0.64 to cover 64×128
    # ... scaled to cover 32·2×64·2) keeps the boundary in the middle column
    img = np.zeros((100, 100, 3), np.uint8)
    img[:, 50:] = 255
    pp = Preprocess(size=32, width=64, resize_short=32, mean=(0, 0, 0), std=(1, 1, 1))
    x = load_image(_png(tmp_path / "a.png", img), pp)
    assert x.shape == (3, 32, 64)
    assert x[:, :, :28].max() < 5 and x[:, :, 36:].min() > 250  # left black, right white: centred
    assert Preprocess.for_size(32, width=64).resize_short == round(32 * 256 / 224)


def test_pad_mode_keeps_aspect_and_zero_pads_after_normalising(tmp_path):
    from sedeploy.preprocess import Preprocess, load_image

    img = np.full((20, 40, 3), 200, np.uint8)  # 2:1 text line
    pp = Preprocess(size=16, width=64, resize_short=16, mean=(127.5,) * 3, std=(127.5,) * 3, resize_mode="pad")
    x = load_image(_png(tmp_path / "line.png", img), pp)
    assert x.shape == (3, 16, 64)
    np.testing.assert_allclose(x[:, :, :32], (200 - 127.5) / 127.5, atol=1e-5)  # resized to 16×32
    assert np.all(x[:, :, 32:] == 0)  # zero after normalisation, as PaddleOCR pads
    wide = np.full((10, 400, 3), 200, np.uint8)  # wider than 64 at height 16: squeezed to the full width
    assert np.all(load_image(_png(tmp_path / "wide.png", wide), pp) != 0)


def test_bgr_reverses_the_channels_and_mean_is_per_model_channel(tmp_path):
    from sedeploy.preprocess import Preprocess, load_image

    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30  # R, G, B
    rgb = load_image(_png(tmp_path / "c.png", img), Preprocess(size=8, resize_short=8, mean=(0, 0, 0),
                                                               std=(1, 1, 1)))
    bgr = load_image(tmp_path / "c.png", Preprocess(size=8, resize_short=8, mean=(30, 0, 0), std=(1, 1, 1),
                                                    channel_order="bgr"))
    assert rgb[:, 0, 0].tolist() == [10, 20, 30]
    assert bgr[:, 0, 0].tolist() == [0, 20, 10]  # B − 30, G, R


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from sedeploy.preprocess import Preprocess, load_image

    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :20] = 255  # a white band on the left, as stored
    stored = Image.fromarray(img)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(tmp_path / "rot.png", exif=exif.tobytes())
    pp = Preprocess(size=40, resize_short=40, mean=(0, 0, 0), std=(1, 1, 1))
    x = load_image(tmp_path / "rot.png", pp)
    upright = np.asarray(Image.fromarray(img).transpose(Image.Transpose.ROTATE_270))  # what a viewer shows
    assert upright.shape[:2] == (60, 40)
    expected = load_image(_png(tmp_path / "upright.png", upright), pp)
    np.testing.assert_array_equal(x, expected)
    assert x[:, :5].mean() > 200 and x[:, -5:].mean() < 50  # the band is now on top


def test_an_extreme_aspect_ratio_is_skipped_cheaply(tmp_path, caplog):
    from sedeploy.preprocess import Preprocess, load_batch

    strip = _png(tmp_path / "strip.png", np.zeros((1, 20000, 3), np.uint8))
    ok = _png(tmp_path / "ok.png", np.zeros((300, 400, 3), np.uint8))
    t0 = time.perf_counter()
    x, loaded = load_batch([strip, ok], Preprocess())
    assert time.perf_counter() - t0 < 5
    assert loaded == [ok] and x.shape == (1, 3, 224, 224)
    assert "strip.png (too large after resizing" in caplog.text


def test_layout_batch():
    from sedeploy.preprocess import layout_batch

    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert layout_batch(x, "NCHW") is x
    y = layout_batch(x, "NHWC")
    assert y.shape == (2, 4, 5, 3) and y.flags.c_contiguous and y[1, 2, 3, 0] == x[1, 0, 2, 3]
    with pytest.raises(SedeployError):
        layout_batch(x, "CHWN")


@pytest.mark.parametrize("mean,std,ok", [((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), True),
                                         ((127.5,) * 3, (127.5,) * 3, True), ((0, 0, 0), (1, 1, 1), True),
                                         ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
                                         ((127.5,) * 3, (1e-30,) * 3, False), ((0.5,) * 3, None, False)])
def test_normalisation_on_the_0_1_scale_is_refused_with_its_0_255_values(mean, std, ok):
    from sedeploy.preprocess import check_normalisation

    if ok:
        check_normalisation(mean, std)
        return
    with pytest.raises(SedeployError, match="0–1 scale|not a normalisation") as err:
        check_normalisation(mean, std)
    if mean == (0.485, 0.456, 0.406):
        assert "--mean 123.675,116.28,103.53 --std 58.395,57.12,57.375" in err.value.fix
    if std == (1e-30,) * 3:  # a typo, not a scale: no ×255 "fix" is offered
        assert "not a normalisation" in str(err.value) and "2.55e-28" not in err.value.fix


# ---------------------------------------------------------------------------------------------- end to end
def test_build_engine_dynamic_hw_needs_input_shape_then_builds(tmp_path, calib_dir):
    from sedeploy.cli import cli

    dyn = tmp_path / "dyn.onnx"
    onnx.save(_classifier(["N", 3, "H", "W"]), str(dyn))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(dyn), "--backend", "ort", "-o", str(out)])
    assert r.exit_code == 2 and "--input-shape" in r.output and "sedeploy export" not in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(cli, ["build-engine", str(dyn), "--input-shape", "24x40", "--channel-order", "bgr",
                                 "--resize-mode", "pad", "--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5",
                                 "--backend", "ort", "--no-fuse-se", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["shapes"]["input"][1:] == [3, 24, 40] and res["shapes"]["input_changes"]["pinned"] == [24, 40]
    from sedeploy.onnxcore import META, get_metadata, image_input, load_onnx

    art = load_onnx(out / "dyn.fp32.onnx")
    pp = get_metadata(art)[META.PREPROCESS]
    assert (pp["size"], pp["width"], pp["channel_order"], pp["resize_mode"]) == (24, 40, "bgr", "pad")
    assert image_input(art).width == 40
    r = CliRunner().invoke(cli, ["bench", str(out), "--images", str(calib_dir), "--image-limit", "8", "--batch",
                                 "2", "--repeats", "2", "--warmup", "1", "--no-probe", "--no-torch-baseline"])
    assert r.exit_code == 0, r.output


def test_nhwc_model_builds_nchw_artifacts_and_bench_feeds_each_its_layout(tmp_path, calib_dir):
    from sedeploy.cli import cli
    from sedeploy.onnxcore import META, get_metadata, image_input, load_onnx

    src = tmp_path / "tf.onnx"
    onnx.save(_classifier([1, 32, 48, 3], nhwc=True), str(src))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(src), "--fp16", "--calib", str(calib_dir), "--mean",
                                 "127.5,127.5,127.5", "--std",
                                 "127.5,127.5,127.5", "--resize", "40", "--backend", "ort", "-o", str(out)])
    assert r.exit_code == 0, r.output
    art = load_onnx(out / "tf.fp32.onnx")
    assert image_input(art).layout == "NCHW" and get_metadata(art)[META.INPUT_LAYOUT] == "NCHW"
    assert get_metadata(art)[META.INPUT_CHANGES]["source_layout"] == "NHWC"
    # the NHWC source and the NCHW artifact side by side: bench feeds each its own layout, so they agree exactly
    r = CliRunner().invoke(cli, ["bench", str(src), str(out / "tf.fp32.onnx"), "--reference", "tf",
                                 "--images", str(calib_dir), "--image-limit", "8", "--batch", "1", "--repeats", "2",
                                 "--warmup", "1", "--no-probe", "--no-torch-baseline", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    drift = {e["name"]: e["accuracy"] for e in res["engines"]}
    assert drift["tf.fp32"]["top1_agreement_pct"] == 100.0 and drift["tf.fp32"]["max_abs_logit_diff"] == 0.0


def test_mean_for_a_model_with_recorded_preprocessing_warns_and_is_recorded(tmp_path, calib_dir):
    from sedeploy.cli import cli
    from sedeploy.onnxcore import META, get_metadata, load_onnx, set_metadata
    from sedeploy.preprocess import Preprocess

    m = _classifier([1, 3, 32, 32])
    set_metadata(m, {META.PREPROCESS: Preprocess.for_size(32).as_dict()})
    src = tmp_path / "ours.onnx"
    onnx.save(m, str(src))
    r = CliRunner().invoke(cli, ["build-engine", str(src), "--mean", "127.5,127.5,127.5", "--backend", "ort",
                                 "--no-fuse-se", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "replaces the one the model records" in r.output
    pp = get_metadata(load_onnx(tmp_path / "out" / "ours.fp32.onnx"))[META.PREPROCESS]
    assert pp["mean"] == [127.5] * 3 and pp["std"] == list(Preprocess().std)


@pytest.mark.slow
def test_real_tf2onnx_nhwc_mobilenet_matches_its_nchw_export(shared_data, tmp_path):
    """The converter's own --inputs-as-nchw export of the same weights is what the NHWC model becomes."""
    from sedeploy.onnxcore import image_input, load_onnx, nchw_input, run_model
    from sedeploy.preprocess import smooth_noise

    models = shared_data / "models"
    ours, how = nchw_input(load_onnx(models / "mobilenet_v1_0.25_224_tf2onnx.onnx"))
    assert "dropped" in how and image_input(ours).layout == "NCHW"
    x = smooth_noise(1, 224, seed=4)
    ref = run_model(load_onnx(models / "mobilenet_v1_0.25_224_tf2onnx_nchw.onnx"), x)
    np.testing.assert_allclose(run_model(ours, x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_real_paddle_dynamic_hw_pins_to_the_same_outputs(shared_data):
    from sedeploy.onnxcore import image_input, load_onnx, pin_image_size, run_model
    from sedeploy.preprocess import smooth_noise

    src = load_onnx(shared_data / "models" / "ppocr_textdir_cls_paddle2onnx_op13.onnx")
    pinned = pin_image_size(src, 48, 192)
    assert (image_input(pinned).height, image_input(pinned).width) == (48, 192)
    x = smooth_noise(2, (48, 192), seed=5)  # static shapes let ONNX Runtime pick other kernels: rounding differs
    np.testing.assert_allclose(run_model(pinned, x), run_model(src, x), rtol=1e-5, atol=1e-6)
