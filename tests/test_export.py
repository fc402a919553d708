"""Export produces one verified, self-contained ONNX file — or nothing at all."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sedeploy import export as E
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.model import build_model
from sedeploy.preprocess import Preprocess, load_folder


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_tiny_export_is_self_contained_checked_and_dynamic(tiny_model, tiny_onnx, calib_dir):
    assert not tiny_onnx.with_name(tiny_onnx.name + ".data").exists()
    onnx.checker.check_model(str(tiny_onnx), full_check=True)
    sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    x, _ = load_folder(calib_dir, Preprocess.for_size(32), limit=5)
    for batch in (1, 5):  # dynamic batch
        got = sess.run(None, {"input": x[:batch]})[0]
        with torch.no_grad():
            ref = tiny_model(torch.from_numpy(x[:batch])).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("opset, squeeze, exporter", [(17, "GlobalAveragePool", "torchscript"),
                                                      (18, "ReduceMean", "dynamo")])
def test_opset_selects_exporter(tiny_model, tmp_path, opset, squeeze, exporter):
    res = E.export_model(depth=18, base_channels=8, input_size=32, opset=opset, output=tmp_path / "m.onnx",
                         verify_limit=4)
    assert res.exporter == exporter and res.opset == opset
    proto = onnx.load(res.path)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    assert _ops(res.path).count(squeeze) >= 8  # 8 SE squeezes (+ the neck pool)


def test_metadata_and_result_fields(tmp_path):
    res = E.export_model(depth=18, base_channels=8, input_size=32, output=tmp_path / "m.onnx", verify_limit=4,
                         num_classes=7)
    md = E.read_metadata(res.path)
    assert md["sedeploy.depth"] == 18 and md["sedeploy.num_classes"] == 7
    assert md["sedeploy.params"] == res.params and md["sedeploy.flops"] == res.flops
    assert md["sedeploy.weights"].startswith("random")
    assert md["sedeploy.preprocess"]["mean"] == [123.675, 116.28, 103.53]
    d = res.as_dict()
    for key in ("path", "params", "flops", "max_abs_diff", "top1_agreement", "weights", "opset", "seconds"):
        assert key in d
    json.dumps(d)  # serialisable for --json


def test_fixed_batch_export(tmp_path):
    res = E.export_model(depth=18, base_channels=8, input_size=32, output=tmp_path / "m.onnx", verify_limit=5,
                         dynamic_batch=False, batch_size=4)
    dims = onnx.load(res.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 32, 32]
    assert res.verification.images == 5  # last chunk padded to the fixed batch


def test_verification_failure_leaves_no_file(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="not written"):
        E.export_model(depth=18, base_channels=8, input_size=32, output=out, verify_limit=4, atol=1e-12,
                       rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_tolerance_scales_with_each_input_sets_own_logits():
    def ver(diff, diff_rand, scale, scale_rand):
        return E.Verification(images=4, random_inputs=2, max_abs_diff=diff, max_abs_diff_random=diff_rand,
                              top1_agreement=1.0, distinct_top1=4, atol=1e-4, image_folder="", rtol=4e-6,
                              logit_scale=scale, logit_scale_random=scale_rand)

    assert ver(1.8e-4, 1e-4, 175.0, 20.0).passed  # deep net, large logits: 1e-4 + 7e-4
    assert not ver(1.8e-4, 1e-4, 10.0, 175.0).passed  # the random set's large logits do not excuse the images
    assert not ver(1e-4, 3e-4, 175.0, 10.0).passed
    assert ver(1e-4, 0.0, 0.0, 0.0).passed and not ver(1.01e-4, 0.0, 0.0, 0.0).passed  # atol alone at scale 0


def test_interrupted_export_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "verify_onnx", boom)
    with pytest.raises(KeyboardInterrupt):
        E.export_model(depth=18, base_channels=8, input_size=32, output=tmp_path / "m.onnx", verify_limit=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [9, 12, 99])
def test_unsupported_opset_is_a_clear_error(tmp_path, opset):
    with pytest.raises(SedeployError, match=r"(?s)Opset .* not supported.*--opset 18"):
        E.export_model(depth=18, base_channels=8, input_size=32, output=tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SedeployError, match="not writable"):
        E.export_model(depth=18, base_channels=8, input_size=32, output=blocker / "m.onnx", verify_limit=2)


def test_empty_verification_folder_is_a_clear_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(SedeployError, match="verification image folder.*contains no images"):
        E.export_model(depth=18, base_channels=8, input_size=32, output=tmp_path / "m.onnx",
                       verify_images=tmp_path / "imgs")


@pytest.mark.slow
def test_se_resnet50_parity_on_real_images(tmp_path, shared_data):
    """The headline export: SE-ResNet-50 at 224, verified on the shipped photos; then checked on ImageNet val."""
    res = E.export_model(depth=50, output=tmp_path / "se50.onnx")
    v = res.verification
    assert v.max_abs_diff <= 1e-4 and v.max_abs_diff_random <= 1e-4 and v.top1_agreement == 1.0
    assert v.distinct_top1 >= 5  # not a degenerate network predicting one class
    x, _ = load_folder(shared_data / "imagenet-val-1300" / "images", limit=16)
    extra = E.verify_onnx(build_model(50), res.path, images=x, random_inputs=0)
    assert extra.max_abs_diff <= 1e-4 and extra.top1_agreement == 1.0
    assert res.params == 28_088_024 and res.flops == 4_127_927_392


@pytest.mark.slow
def test_export_bytes_do_not_depend_on_the_checkout_or_the_output_folder(tmp_path, calib_dir):
    """The same network exported by this checkout and by a copy of it elsewhere, into two folders: the same bytes.

    The exporter records each node's Python source location (absolute paths) unless export drops it."""
    package = Path(E.__file__).resolve().parent
    other = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(package, other / "sedeploy", ignore=shutil.ignore_patterns("__pycache__"))
    kw = dict(depth=18, base_channels=8, input_size=32, verify_limit=2, verify_images=str(calib_dir))
    here, there = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    here.parent.mkdir()
    E.export_model(output=here, **kw)
    code = f"from sedeploy import export as E; E.export_model(output={str(there)!r}, **{kw!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(other)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = here.read_bytes()
    assert str(package.parent).encode() not in data and str(other).encode() not in there.read_bytes()
    assert data == there.read_bytes()
    scopes = {p.key for n in onnx.load(str(here)).graph.node for p in n.metadata_props}
    assert "namespace" in scopes and not scopes & E.LOCATION_METADATA_KEYS
