"""`build-engine --int8` never writes a silently degraded INT8 engine (sedeploy.int8_check), and a backend that cannot
compile an artifact is not fatal under `--backend auto` (the precision falls back to ONNX Runtime, said)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sedeploy import int8_check
from sedeploy.quantize import select_images
from sedeploy.cli import cli
from sedeploy.metrics import REPORT_CONFIDENCE, agreement_lower_bound
from sedeploy.build import BuildOptions, build_engines, format_result

try:
    import openvino  # noqa: F401
    HAVE_OV = True
except ImportError:
    HAVE_OV = False
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="the 'openvino' package is not installed")


def _folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` smooth random RGB images (PNG, 40 px) in a flat folder."""
    from PIL import Image

    from sedeploy.preprocess import smooth_noise

    root.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(smooth_noise(n, 40, seed=seed)):
        x = x - x.min()
        Image.fromarray((255 * x / max(x.max(), 1e-6)).transpose(1, 2, 0).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def images64(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("img") / "calib", 64)


# ------------------------------------------------------------------------------------------------ the plan
def test_plan_split_unpicked_val_and_too_few(tmp_path):
    small = _folder(tmp_path / "small", 27)
    held = int8_check.plan(small, val=None, count=None, seed=0, method="mse")
    # a folder of ≤ --calib-count images: a seeded quarter held out, the rest calibrated on (said)
    assert held.source == "split" and len(held.paths) == 7 and len(held.exclude) == 7
    assert held.calib_before == 27 and held.calib_after == 20 and "--val" in held.what
    _, calibrated = select_images(small, None, 0, held.exclude)
    assert not {p.name for p in calibrated} & {p.name for p in held.paths} and len(calibrated) == 20
    # the same seed, the same split; another seed, another one
    assert int8_check.plan(small, val=None, count=None, seed=0, method="mse").paths == held.paths
    assert int8_check.plan(small, val=None, count=None, seed=1, method="mse").paths != held.paths
    # more images than calibration picks: the ones it did not pick, calibration unchanged, at most MAX_IMAGES
    big = _folder(tmp_path / "big", 300, seed=1)
    held = int8_check.plan(big, val=None, count=32, seed=0, method="mse")
    _, picked = select_images(big, 32, 0)
    assert held.source == "unpicked" and not held.exclude
    assert len(held.paths) == int8_check.MAX_IMAGES and not set(held.paths) & set(picked)
    held = int8_check.plan(big, val=None, count=200, seed=0, method="mse")
    assert len(held.paths) == 100 and not set(held.paths) & set(select_images(big, 200, 0)[1])
    # --val: its images, capped
    held = int8_check.plan(small, val=big, count=None, seed=0, method="mse")
    assert held.source == "val" and len(held.paths) == int8_check.MAX_IMAGES and not held.exclude
    # too few to split and still calibrate: not measured, with the reason
    tiny = _folder(tmp_path / "tiny", 18)
    why = int8_check.plan(tiny, val=None, count=None, seed=0, method="mse")
    assert isinstance(why, str) and "18 images" in why and "16" in why
    assert int8_check.plan(tiny, val=None, count=None, seed=0, method="minmax").calib_after == 14


@pytest.mark.parametrize("bad", [-1, 100.5, float("nan"), True])
def test_warn_agreement_is_validated(bad):
    with pytest.raises(int8_check.SedeployError, match="--warn-agreement"):
        int8_check.check_warn_agreement(bad)


def test_cli_warn_agreement_refused_before_any_work(tiny_onnx, tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "-o", str(out), "--int8", "--warn-agreement", "101"])
    assert r.exit_code == 2 and "--warn-agreement 101" in r.output and "percentage" in r.output
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "-o", str(out), "--warn-agreement", "90"])
    assert r.exit_code == 2 and "--int8" in r.output
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------ the check
@pytest.mark.slow
def test_default_check_measures_every_int8_artifact(tiny_onnx, images64, tmp_path):
    opts = BuildOptions.from_flat(int8=True, backend="ort", calib=images64, calib_cache=tmp_path / "c.json",
                                  threads=1, progress=False)
    res = build_engines(tiny_onnx, tmp_path / "o", opts)
    check = res.int8_check
    assert check["measured"] and check["heldout"]["source"] == "split" and check["heldout"]["images"] == 16
    assert res.calibration["images"] == 48 and res.calibration["held_out"] == 16  # the shrink is in the result
    assert set(check["artifacts"]) == {"int8-trt", "int8-cpu"}
    for kind, m in check["artifacts"].items():
        assert m["runtime"] == "ort" and m["n"] == 16
        assert m["agreement_pct"] == pytest.approx(100 * m["agree"] / 16, abs=1e-3)
        assert m["agreement_lcb_pct"] == pytest.approx(agreement_lower_bound(m["agree"], 16, REPORT_CONFIDENCE),
                                                       abs=1e-3)
        assert m["below_warn"] is (m["agreement_pct"] < int8_check.DEFAULT_WARN_AGREEMENT)
        assert any(n.startswith("WARNING") and kind in n for n in res.notes) is m["below_warn"]
    assert "FP16 parts" in check["artifacts"]["int8-trt"]["note"]
    text = format_result(res)
    assert "INT8 check" in text and "n = 16" in text and "lower bound" in text
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["int8_check"] == json.loads(json.dumps(check)) and "_int8_pending" not in manifest
    # the figures are the artifacts' own: recomputed here from the published files on the images not calibrated on
    from sedeploy.quantize import CalibrationResult
    from sedeploy.onnxcore import run_model
    from sedeploy.preprocess import Preprocess, load_batch

    calibrated = set(CalibrationResult.load(tmp_path / "c.json").images)
    x, _ = load_batch([p for p in sorted(images64.iterdir()) if p.name not in calibrated], Preprocess.for_size(32))
    ref = run_model(next(a.path for a in res.artifacts if a.precision == "fp32"), x).argmax(1)
    got = run_model(next(a.path for a in res.artifacts if a.kind == "int8-cpu"), x).argmax(1)
    assert int((ref == got).sum()) == check["artifacts"]["int8-cpu"]["agree"]


@pytest.mark.slow
def test_a_degraded_int8_engine_is_warned_not_silent(tiny_onnx, images64, tmp_path, monkeypatch, caplog):
    """A fault that flips every INT8 top-1 (its logits rolled by one class): exit 0, but a warning on stderr, in
    the notes, in the JSON result and in the summary; --warn-agreement 0 never warns."""
    real = int8_check.logits

    def degraded(path, runtime, images, *, threads, precision):
        out = real(path, runtime, images, threads=threads, precision=precision)
        return np.roll(out, 1, axis=1) if precision == "int8" else out

    monkeypatch.setattr(int8_check, "logits", degraded)
    args = ["build-engine", str(tiny_onnx), "--int8", "--backend", "none", "--calib", str(images64), "--calib-count",
            "32", "--calib-method", "minmax", "--calib-cache", str(tmp_path / "c.json")]
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    check = d["int8_check"]
    assert check["heldout"]["source"] == "unpicked" and check["heldout"]["images"] == 32
    assert d["calibration"]["images"] == 32 and d["calibration"]["held_out"] == 0  # calibration as without it
    for kind in ("int8-trt", "int8-cpu"):
        m = check["artifacts"][kind]
        assert m["agree"] == 0 and m["below_warn"] is True
        assert any(n.startswith("WARNING") and kind in n and "--min-agreement 97" in n for n in d["notes"])
        assert f"{kind} agrees with FP32 on 0.00 %" in caplog.text
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "b")])
    assert r.exit_code == 0 and "BELOW 97 %" in r.stdout
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "c"), "--json", "--warn-agreement", "0"])
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and d["int8_check"]["warn_below_pct"] == 0
    assert not any(m["below_warn"] for m in d["int8_check"]["artifacts"].values())
    assert "agrees with FP32" not in caplog.text and not any(n.startswith("WARNING") for n in d["notes"])


def test_too_small_a_calib_folder_is_said_not_skipped_silently(tiny_onnx, tmp_path, caplog):
    folder = _folder(tmp_path / "c", 18)
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        res = build_engines(tiny_onnx, tmp_path / "o", BuildOptions.from_flat(int8=True, backend="none", calib=folder,
                                                                    calib_cache=tmp_path / "c.json",
                                                                    progress=False))
    assert res.int8_check["measured"] is False and "18 images" in res.int8_check["reason"]
    assert res.calibration["images"] == 18 and "not measured" in caplog.text and "--val" in caplog.text
    assert "INT8 check  not measured" in format_result(res)


@pytest.mark.slow
def test_budget_figures_are_reused_not_measured_again(tiny_onnx, images64, tmp_path, monkeypatch):
    calls = []
    real = int8_check.measure
    monkeypatch.setattr(int8_check, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    opts = BuildOptions.from_flat(int8=True, backend="ort", calib=images64, calib_method="minmax", min_agreement=1.0,
                                  calib_cache=tmp_path / "c.json", threads=1, progress=False)
    res = build_engines(tiny_onnx, tmp_path / "o", opts)
    assert calls == []  # both flavours were measured by the budget on ONNX Runtime CPU
    for flavour in ("trt", "cpu"):
        m, r = res.int8_check["artifacts"][f"int8-{flavour}"], res.int8_budget["flavours"][flavour]["result"]
        assert (m["n"], m["agree"], m["agreement_lcb_pct"]) == (r["n"], r["agree"], r["agreement_lcb_pct"])
        assert "budget" in m["from"]
    assert res.int8_check["heldout"]["source"] == "budget"


# ------------------------------------------------------------------------------------ OpenVINO and its fallback
def _refuse_int8(monkeypatch):
    """OpenVINO's compile raises its own error type (RuntimeError) for any model with FakeQuantize (INT8)."""
    import openvino as ov

    real = ov.Core.compile_model

    def compile_model(self, model, *args, **kwargs):
        m = self.read_model(model) if isinstance(model, (str, Path)) else model
        if any(op.get_type_name() == "FakeQuantize" for op in m.get_ordered_ops()):
            raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\n"
                               "[CPU] FakeQuantize node q17 has unsupported input precision")
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(ov.Core, "compile_model", compile_model)
    import sedeploy.backends as backends

    monkeypatch.setattr(backends, "default_cpu_backend", lambda: "openvino")


@needs_ov
@pytest.mark.slow
def test_int8_ov_is_measured_on_openvino(tiny_onnx, images64, tmp_path):
    opts = BuildOptions.from_flat(int8=True, backend="openvino", calib=images64, calib_method="minmax", threads=1,
                                  calib_cache=tmp_path / "c.json", progress=False)
    res = build_engines(tiny_onnx, tmp_path / "o", opts)
    runtimes = {k: m["runtime"] for k, m in res.int8_check["artifacts"].items()}
    assert runtimes == {"int8-trt": "ort", "int8-cpu": "ort", "int8-ov": "openvino"}
    assert "on OpenVINO CPU" in format_result(res)


@needs_ov
@pytest.mark.slow
def test_auto_builds_on_onnx_runtime_what_openvino_cannot_compile(tiny_onnx, images64, tmp_path, monkeypatch,
                                                                    caplog):
    _refuse_int8(monkeypatch)
    out = tmp_path / "o"
    args = ["build-engine", str(tiny_onnx), "--int8", "--calib", str(images64), "--calib-method", "minmax",
            "--calib-cache", str(tmp_path / "c.json"), "--threads", "1", "-o", str(out)]
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    engines = {(e["backend"], e["kind"]) for e in manifest["engines"]}
    assert engines == {("openvino", "fp32"), ("ort", "int8-cpu")}  # FP32 stays OpenVINO's, INT8 on ORT
    fb = next(e["fallback"] for e in manifest["engines"] if e["backend"] == "ort")
    assert fb["backend"] == "openvino" and fb["artifact"].endswith(".int8-ov.onnx")
    assert "unsupported input precision" in fb["reason"] and "openvinotoolkit/openvino/issues" in fb["report"]
    assert {Path(a["path"]).name.split(".", 1)[1] for a in manifest["artifacts"]} >= {"int8-ov.onnx", "int8-cpu.onnx"}
    for e in manifest["engines"]:
        assert all(Path(f).is_file() for f in e["files"])
    assert (out / f"{tiny_onnx.stem}.int8-ov.onnx").is_file()  # the artifact is kept
    assert "fallback: OpenVINO cannot compile" in r.stdout and "openvinotoolkit/openvino/issues" in r.stdout
    assert "unsupported input precision" in caplog.text and "--backend auto built its INT8 engine on ONNX Runtime" \
        in caplog.text
    ov = manifest["int8_check"]["artifacts"]["int8-ov"]
    assert ov["runtime"] == "ort" and "OpenVINO could not compile it" in ov["note"]


@needs_ov
@pytest.mark.slow
def test_explicit_openvino_that_cannot_compile_fails_with_a_true_fix(tiny_onnx, images64, tmp_path, monkeypatch):
    _refuse_int8(monkeypatch)
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "--int8", "--backend", "openvino", "--calib",
                                 str(images64), "--calib-method", "minmax", "--calib-cache", str(tmp_path / "c.json"),
                                 "--threads", "1", "-o", str(out)])
    assert r.exit_code == 2, r.output
    fix = r.output.split("Fix:", 1)[1]
    assert "--backend auto" in fix and "--backend ort" in fix and "--backend openvino" not in fix
    assert "unsupported input precision" in r.output and "int8-ov" in r.output and "Traceback" not in r.output
    assert r.output.count("Fix:") == 1
    assert not out.exists() or not any(out.iterdir())  # nothing published


def test_val_sharing_images_with_calibration_is_refused_before_any_work(tmp_path, images64):
    """--val must be held out: the --calib folder itself, a link to it, or a folder holding copies of calibration
    images is refused with one clear error (it would flatter every figure measured on it), before calibrating."""
    import shutil

    copies = tmp_path / "copies"
    copies.mkdir()
    for p in sorted(images64.iterdir())[:3]:
        shutil.copy(p, copies / f"renamed-{p.name}")
    _folder(copies, 5, seed=7)  # and some images of its own (names 000–004 do not clash with the copies)
    link = tmp_path / "link"
    link.symlink_to(images64)
    for val in (images64, link, copies):
        with pytest.raises(int8_check.SedeployError, match=r"--val .*images calibration uses from --calib.*not held"):
            int8_check.plan(images64, val=val, count=None, seed=0, method="mse")
    fresh = _folder(tmp_path / "fresh", 6, seed=9)
    assert int8_check.plan(images64, val=fresh, count=None, seed=0, method="mse").source == "val"


def test_cli_val_equal_to_calib_is_exit_2_and_writes_nothing(tiny_onnx, tmp_path, images64):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(tiny_onnx), "--int8", "--calib", str(images64), "--val",
                                 str(images64), "--backend", "ort", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "not held out" in r.output and not (out / "manifest.json").exists()
