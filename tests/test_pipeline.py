"""`build-engine` end to end on the tiny trained SE-ResNet-18: artifacts, engines, manifest, errors, inspect."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sedeploy.onnxcore import graph_precision
from sedeploy.backends.ort import OrtRunner
from sedeploy.cli import cli
from sedeploy.artifacts import artifact_stem
from sedeploy.build import BuildOptions, build_engines
from sedeploy.errors import SedeployError
from tiny_trained import INT8_MIN_AGREEMENT, MIN_TEST_ACCURACY, assert_flips_only_near_ties


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _logits(path, x):
    with OrtRunner(path, threads=1) as r:
        return r.infer(x)


def _top1(path, x):
    return _logits(path, x).argmax(1)


@pytest.fixture(scope="module")
def built(tiny_trained_art, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    opts = BuildOptions.from_flat(backend="ort", fp16=True, int8=True, calib=tiny_trained_art.calib_dir,
                                  calib_cache=out / "calib.json", threads=1, progress=False)
    return build_engines(tiny_trained_art.onnx_path, out, opts), out


def test_every_precision_is_written_and_agrees_with_fp32(built, tiny_trained_art):
    res, out = built
    assert res.se_blocks_found == res.se_blocks_fused == 8  # SE-ResNet-18: 8 BasicBlocks, one SE each
    kinds = {(a.precision, a.flavour) for a in res.artifacts}
    assert kinds == {("fp32", None), ("fp16", None), ("int8", "trt"), ("int8", "cpu")}
    for a in res.artifacts:
        onnx.checker.check_model(a.path, full_check=True)
        assert graph_precision(a.path) == a.precision
    x, y = tiny_trained_art.images, tiny_trained_art.labels
    ref_logits = _logits(out / f"{artifact_stem(tiny_trained_art.onnx_path)}.fp32.onnx", x)
    ref = ref_logits.argmax(1)
    assert (ref == y).mean() >= MIN_TEST_ACCURACY  # the trained network is not degenerate
    for a in res.artifacts:
        got = _logits(a.path, x)
        if a.precision == "fp16":  # no confident image flips; near-ties on ≤ 1 % (any CPU's FP16/FP32 kernels)
            assert_flips_only_near_ties(ref_logits, got)
            continue
        agree = (got.argmax(1) == ref).mean()
        # INT8: the bound of tiny_trained.INT8_MIN_AGREEMENT (the model and the INT8 kernels differ per CPU)
        bound = INT8_MIN_AGREEMENT if a.precision == "int8" else 1.0
        assert agree >= bound, (a.path, agree)
    assert res.validation["ok"] is True


def test_ort_engines_and_manifest(built):
    res, out = built
    from sedeploy.backends.ort import cpu_computes_fp16

    built_from = {Path(e["from"]).name.split(".", 1)[1] for e in res.engines}
    # the TensorRT Q/DQ form is not an ORT engine; FP16 is one only where ORT's CPU provider computes in FP16
    fp16 = {"fp16.onnx"} if cpu_computes_fp16() else set()
    assert built_from == {"fp32.onnx", "int8-cpu.onnx"} | fp16
    if not fp16:
        assert any("fp16.onnx: written as a portable artifact; no ONNX Runtime engine" in n and "FP32 kernels" in n
                   for n in res.notes)
    for e in res.engines:
        assert Path(e["path"]).is_file() and Path(e["sidecar"]).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["se_blocks_fused"] == 8 and len(manifest["artifacts"]) == 4
    # 64 calibration images, none more than --calib-count: a seeded quarter is held out for the INT8 check
    assert manifest["calibration"]["images"] == 48 and manifest["calibration"]["cache_hit"] is False
    check = manifest["int8_check"]
    assert check["heldout"]["images"] == 16 and set(check["artifacts"]) == {"int8-trt", "int8-cpu"}
    # the trained network's INT8 agrees: nothing to warn about (97 % floor, 16 images: every one agrees or a warning)
    assert all(m["below_warn"] is (m["agreement_pct"] < 97) for m in check["artifacts"].values())
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_second_build_hits_the_calibration_cache(built, tiny_trained_art, tmp_path):
    res, out = built
    opts = BuildOptions.from_flat(int8=True, calib=tiny_trained_art.calib_dir, calib_cache=out / "calib.json",
                        backend="none", progress=False)
    again = build_engines(tiny_trained_art.onnx_path, tmp_path, opts)
    assert again.calibration["cache_hit"] is True and again.engines == []


def test_artifact_input_builds_only_its_engine(built, tmp_path):
    res, out = built
    cpu = next(a.path for a in res.artifacts if a.flavour == "cpu")
    again = build_engines(cpu, tmp_path, BuildOptions.from_flat(backend="ort", threads=1, progress=False))
    assert again.se_blocks_found is None and len(again.engines) == 1
    assert again.engines[0]["precision"] == "int8"
    with pytest.raises(SedeployError, match="already an INT8 artifact"):
        build_engines(cpu, tmp_path, BuildOptions.from_flat(backend="ort", fp16=True, progress=False))


def test_auto_builds_an_int8_cpu_artifact_for_onnx_runtime(built, tmp_path):
    """--backend auto given ONNX Runtime's own INT8 form (QOperator, which OpenVINO cannot read): it is built for
    ONNX Runtime, whatever the default CPU backend is."""
    res, out = built
    cpu = next(a.path for a in res.artifacts if a.flavour == "cpu")
    again = build_engines(cpu, tmp_path / "auto", BuildOptions.from_flat(backend="auto", threads=1, progress=False))
    assert [e["backend"] for e in again.engines] == ["ort"]


def test_artifact_of_the_other_flavour_is_built_as_asked_with_a_note(built, tmp_path):
    """The TensorRT Q/DQ form given to the ONNX Runtime backend: built (ORT reads it), and the summary says it is
    not the form ORT runs fastest — never an exit 0 with nothing built."""
    res, _ = built
    trt = next(a.path for a in res.artifacts if a.flavour == "trt")
    again = build_engines(trt, tmp_path, BuildOptions.from_flat(backend="ort", threads=1, progress=False))
    assert [e["kind"] for e in again.engines] == ["int8-trt"]
    assert any("meant for another backend" in n and "as asked" in n for n in again.notes), again.notes
    from sedeploy.backends.ort import cpu_computes_fp16

    said = any("its FP16 parts compute in FP32 here" in n for n in again.notes)
    assert said is (not cpu_computes_fp16())  # the precision change is said, not only the speed


def test_cpu_quantization_leaves_the_callers_logging_alone(tiny_trained_art, tmp_path, monkeypatch):
    """ORT's quantize_static logs through the root logger (which installs a handler on an unconfigured root);
    sedeploy must not leave a root handler behind."""
    import logging

    from sedeploy.quantize import calibrate
    from sedeploy.quantize import quantize_model

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # an application that configured no logging (pytest adds its own)
    before = []
    cal = calibrate(tiny_trained_art.onnx_path, tiny_trained_art.calib_dir, method="minmax", count=16,
                    cache_dir=tmp_path, progress=False, preprocess=tiny_trained_art.preprocess)
    quantize_model(tiny_trained_art.onnx_path, cal, tmp_path / "m.int8-cpu.onnx", flavour="cpu")
    assert root.handlers == before and not root.filters


def test_cli_json_and_default_calib(tiny_onnx, tmp_path):
    r = _run(["build-engine", str(tiny_onnx), "--int8", "--backend", "none", "--calib-method", "minmax",
              "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["se_blocks_found"] == 8 and d["calibration"]["method"] == "minmax"
    assert d["calibration"]["folder"].endswith("calib") and d["calibration"]["images"] >= 20
    assert any("shipped sample images" in n for n in d["notes"])


def test_trt_backend_without_tensorrt_fails_before_any_work(tiny_onnx, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT error cannot be provoked")
    except ImportError:
        pass
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "--backend", "trt", "-o", str(out)])
    assert r.exit_code == 4
    assert "tensorrt" in r.output.lower() and "pip install" in r.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", ["not_onnx", "two_inputs", "empty_calib", "fp16_on_missing"])
def test_bad_input(case, tiny_onnx, tmp_path):
    model, extra = str(tiny_onnx), []
    if case == "not_onnx":
        model = tmp_path / "x.onnx"
        model.write_bytes(b"not a model at all")
    elif case == "two_inputs":
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 8, 8])])
        model = tmp_path / "two.onnx"
        onnx.save(helper.make_model(g), model)
    elif case == "empty_calib":
        (tmp_path / "empty").mkdir()
        extra = ["--int8", "--calib", str(tmp_path / "empty")]
    else:
        model = tmp_path / "missing.onnx"
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(model), "-o", str(out), "--backend", "none", *extra])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and r.output.count("error:") == 1
    leftovers = [p.name for p in out.rglob("*") if "int8" in p.name or p.name.endswith(".tmp")] if out.exists() else []
    assert leftovers == []


def test_interrupted_build_leaves_no_partial_artifact(tiny_onnx, tmp_path, monkeypatch):
    import sedeploy.quantize as q

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "quantize_model", boom)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "--int8", "--calib-method", "minmax",
                                 "--backend", "none", "-o", str(out)])
    assert r.exit_code == 130
    assert not out.exists()  # nothing was published (no manifest, no artifact), and the run made the folder
    out.mkdir()  # a folder that was there before: kept, still without a partial artifact or a manifest
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "--int8", "--calib-method", "minmax",
                                 "--backend", "none", "-o", str(out)])
    assert r.exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == []


def test_inspect_passes_trt_flavour_and_fails_a_corrupted_one(built, tmp_path):
    res, out = built
    trt = next(a.path for a in res.artifacts if a.flavour == "trt")
    r = _run(["inspect", str(trt), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] is True
    m = onnx.load(trt)
    zero_points = {n.input[2] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2}
    assert zero_points
    for init in m.graph.initializer:  # make every zero point non-zero: asymmetric, which TensorRT rejects
        if init.name in zero_points:
            arr = onnx.numpy_helper.to_array(init).copy()
            init.CopyFrom(onnx.numpy_helper.from_array(arr + np.int8(3), init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, bad)
    r = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert r.exit_code == 3
    assert "zero" in r.output.lower()
    assert "rebuild it with `sedeploy build-engine --int8`" in r.output  # a trt-flavour file: rebuild it
    cpu = next(a.path for a in res.artifacts if a.flavour == "cpu")  # the ONNX Runtime form is right for ORT:
    r = CliRunner().invoke(cli, ["inspect", str(cpu)])
    assert r.exit_code == 3 and "int8-cpu artifact, the form for ONNX Runtime" in r.output
    assert ".int8-trt.onnx artifact the same build wrote" in r.output and "rebuild it" not in r.output


def test_label_offset_travels_with_every_artifact_and_the_manifest(tiny_onnx, calib_dir, tmp_path):
    from sedeploy.onnxcore import META, get_metadata, load_onnx

    out = tmp_path / "eng"
    res = build_engines(tiny_onnx, out, BuildOptions.from_flat(backend="ort", fp16=True, int8=True, calib=calib_dir,
                                                               calib_count=16, label_offset=1, progress=False))
    onnx_files = sorted(out.glob("*.onnx"))
    assert len(onnx_files) >= 3, onnx_files  # FP32, FP16, INT8 artifacts and the ORT engines
    for f in onnx_files:
        assert int(get_metadata(load_onnx(f, weights=False, check=False))[META.LABEL_OFFSET]) == 1, f.name
    assert json.loads((out / "manifest.json").read_text())["label_offset"] == 1 == res.label_offset
    # not given: nothing recorded (bench then scores with its own --label-offset, default 0)
    res = build_engines(tiny_onnx, tmp_path / "plain", BuildOptions.from_flat(backend="ort", progress=False))
    assert res.label_offset is None
    assert META.LABEL_OFFSET not in get_metadata(load_onnx(res.artifacts[0].path, weights=False, check=False))


@pytest.mark.parametrize("offset", [10, 5000])
def test_label_offset_beyond_the_outputs_is_refused_before_any_work(tiny_onnx, tmp_path, offset):
    with pytest.raises(SedeployError, match=rf"--label-offset {offset} is not valid .* has 10 outputs"):
        build_engines(tiny_onnx, tmp_path / "eng", BuildOptions.from_flat(backend="ort", label_offset=offset))
    assert not (tmp_path / "eng").exists()


def test_dynamic_batch_keeps_a_batch_generic_flatten(tmp_path):
    """torch's ``x.view(x.size(0), -1)`` (Shape → Gather → Concat → Reshape) at a fixed batch: --dynamic-batch
    makes the batch dynamic before canonicalisation folds Shape(input) into the literal batch."""
    from flatten_model import flatten_classifier

    src = flatten_classifier(tmp_path / "flat.onnx", batch=4)
    res = build_engines(src, tmp_path / "eng", BuildOptions.from_flat(backend="ort", dynamic_batch=True,
                                                                      progress=False))
    assert res.shapes["static_batch"] is None and "fixed batch 4 →" in res.shapes["batch_handling"]
    x = np.random.default_rng(0).random((7, 3, 16, 16), dtype=np.float32)
    xp = np.concatenate([x, x[:1]])  # the fixed-batch model, run in chunks of 4
    fixed = np.concatenate([_logits(src, xp[:4]), _logits(src, xp[4:])])[:7]
    for a in res.artifacts:
        got = _logits(a.path, x)
        assert got.shape == (7, 10)
        np.testing.assert_allclose(got, fixed, rtol=1e-4, atol=1e-5)
    # a literal batch in the target is still refused, with the reason
    from sedeploy.passes import make_batch_dynamic
    from sedeploy.passes.canonical import canonicalize

    folded, _ = canonicalize(onnx.load(str(src)), label="flat")
    assert make_batch_dynamic(folded)[0] is None
