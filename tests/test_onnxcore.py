"""The ONNX core: one loader, one image-input check, one session factory, one "is quantized", one SE recogniser."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import (Graph, graph_precision, image_input, is_quantized, load_onnx, name_nodes, pad_to_batch,
                               run_model, sha256_file)


def _conv_model(shape, elem=TP.FLOAT, batch_dim=None):
    """x[shape] → Conv(3→4, 1×1) → GlobalAveragePool → Flatten: a tiny image classifier with fixed weights."""
    w = nh.from_array(np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    nodes = [h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("GlobalAveragePool", ["c"], ["p"]),
             h.make_node("Flatten", ["p"], ["y"])]
    dims = list(shape) if batch_dim is None else [batch_dim, *shape[1:]]
    g = h.make_graph(nodes, "m", [h.make_tensor_value_info("x", elem, dims)],
                     [h.make_tensor_value_info("y", TP.FLOAT, None)], [w])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18)])


def test_image_input_reads_nchw_and_nhwc_and_refuses_int_inputs():
    inp = image_input(_conv_model((1, 3, 32, 32)))
    assert (inp.channels, inp.height, inp.width, inp.static_batch, inp.layout) == (3, 32, 32, 1, "NCHW")
    assert image_input(_conv_model((1, 3, 32, 32), batch_dim="N")).dynamic_batch
    nhwc = image_input(_conv_model((1, 32, 48, 3)))  # channels last: described, build-engine makes it NCHW
    assert (nhwc.layout, nhwc.height, nhwc.width) == ("NHWC", 32, 48)
    with pytest.raises(SedeployError, match="uint8"):
        image_input(_conv_model((1, 3, 32, 32), elem=TP.UINT8))
    with pytest.raises(SedeployError, match="1 channel"):
        image_input(_conv_model((1, 1, 32, 32)))
    rect = image_input(_conv_model((1, 3, 32, 48)))  # non-square: centre-cropped to 32×48
    assert (rect.height, rect.width) == (32, 48)


def test_resize_is_checked_against_the_input_before_any_work(tmp_path):
    from click.testing import CliRunner

    from sedeploy.cli import cli

    square = tmp_path / "square.onnx"
    onnx.save(_conv_model((1, 3, 32, 32)), str(square))
    r = CliRunner().invoke(cli, ["build-engine", str(square), "--resize", "0", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--resize 0 is not valid" in r.output  # 0 is a value, not "not given"
    r = CliRunner().invoke(cli, ["build-engine", str(square), "--resize", "100000", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--resize 100000 is not valid" in r.output and "8×" in r.output
    assert not (tmp_path / "out").exists()


def test_run_model_feeds_a_fixed_batch_model_any_number_of_images():
    m = _conv_model((2, 3, 8, 8))
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    got = run_model(m, x)
    assert got.shape == (5, 4)
    ref = run_model(_conv_model((5, 3, 8, 8)), x)  # the same arithmetic at a batch that fits exactly
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_pad_to_batch_repeats_the_last_row_only_when_short():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = pad_to_batch(x, 5)
    assert padded.shape == (5, 2)
    np.testing.assert_array_equal(padded[:3], x)
    np.testing.assert_array_equal(padded[3:], np.repeat(x[-1:], 2, axis=0))
    assert pad_to_batch(x, 3) is x and pad_to_batch(x, None) is x and pad_to_batch(x, 2) is x


def test_loader_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(SedeployError, match="empty file"):
        load_onnx(empty)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx at all" * 10)
    with pytest.raises(SedeployError, match="junk.onnx"):
        load_onnx(junk)
    with pytest.raises(SedeployError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    for name, kind in (("m.fp32.ov.xml", r"an OpenVINO engine \(IR\)"), ("m.fp32.plan", "a TensorRT engine")):
        (tmp_path / name).write_bytes(b"<?xml ...")
        with pytest.raises(SedeployError, match=f"'{tmp_path / name}' is {kind}, not an ONNX model") as err:
            load_onnx(tmp_path / name)
        assert "source_model" in err.value.fix


def test_sha256_of_a_dangling_link_is_a_clear_error(tmp_path):
    link = tmp_path / "a.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(SedeployError, match="symbolic link"):
        sha256_file(link, what="calibration image")


def test_is_quantized_and_precision_from_the_graph():
    m = _conv_model((1, 3, 8, 8))
    assert not is_quantized(m) and graph_precision(m) == "fp32"
    m.graph.node.insert(0, h.make_node("Cast", ["x"], ["x16"], to=TP.FLOAT16))
    assert graph_precision(m) == "fp16"
    q = _conv_model((1, 3, 8, 8))
    q.graph.node.append(h.make_node("QLinearConv", ["a", "b", "c", "d", "e", "f", "g", "h"], ["i"]))
    assert is_quantized(q) and graph_precision(q) == "int8"


def test_name_nodes_gives_unique_names():
    m = _conv_model((1, 3, 8, 8))
    m.graph.node[1].name = "Flatten_2"  # collides with the generated name of node 2
    name_nodes(m)
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == 3
    assert Graph(m).name(m.graph.node[0]) == names[0]


def test_policies_use_the_fusion_recogniser(tiny_onnx):
    """FP16 keep-lists and the INT8 SE policy see exactly the SE blocks the fusion pass recognises."""
    from sedeploy.fp16 import find_precision_groups
    from sedeploy.passes import find_se_blocks, se_block_nodes

    m = onnx.load(str(tiny_onnx))
    name_nodes(m)
    blocks = se_block_nodes(m)
    matched = [c for c in find_se_blocks(m) if c.ok]
    assert len(blocks) == len(matched) == 8
    assert [sorted(b.all) for b in blocks] == [sorted(c.nodes) for c in matched]
    groups = find_precision_groups(m)
    assert set(groups["se"]) == {n for b in blocks for n in b.all}
    assert set(groups["se_gate"]) == {n for b in blocks for n in (*b.excite_logits, *b.gate)}
    ops = {n.name: n.op_type for n in m.graph.node}
    assert {ops[b.scale] for b in blocks} == {"Mul"} and {ops[g] for b in blocks for g in b.gate} == {"Sigmoid"}


def test_load_onnx_names_json_and_non_utf8_paths(tmp_path):
    """A .json name is still read as a binary ONNX file (onnx.load would parse it as JSON protobuf and raise its own
    ParseError), a build's manifest is named as such, and a path that is not UTF-8 is refused before ONNX sees it."""
    import os

    (tmp_path / "manifest.json").write_text('{"artifacts": []}')
    with pytest.raises(SedeployError, match="manifest of a build-engine folder"):
        load_onnx(tmp_path / "manifest.json")
    (tmp_path / "a.json").write_text("garbage")
    with pytest.raises(SedeployError, match="not a readable ONNX file"):
        load_onnx(tmp_path / "a.json")
    good = tmp_path / "model.json"  # a real (binary) model under a .json name loads
    onnx.save(_conv_model((1, 3, 8, 8)), str(good), format="protobuf")
    assert load_onnx(good, check=False).graph.node
    odd = tmp_path / os.fsdecode(b"m\xe9.onnx")
    good.rename(odd)
    with pytest.raises(SedeployError, match="not valid UTF-8") as err:
        load_onnx(odd)
    assert "rename it" in err.value.fix


def test_export_refuses_a_non_utf8_file_name_before_any_work(tmp_path):
    import os

    from click.testing import CliRunner

    from sedeploy.cli import cli

    out = tmp_path / os.fsdecode(b"bad\xff.onnx")
    r = CliRunner().invoke(cli, ["export", "--depth", "18", "-o", str(out)])
    assert r.exit_code == 2 and "not valid UTF-8" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []
