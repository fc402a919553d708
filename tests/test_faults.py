"""Faults and bad input: each ends in one clear error (exit 2/3/4) or is handled correctly, and nothing
is left half-written. Small models only (tiny_onnx: SE-ResNet-18 at width 8, 32 px); each test runs in seconds."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sedeploy.errors import SedeployError

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None, timeout=240):
    """Run the CLI in a subprocess (as a user would): returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sedeploy", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_error(res, code: int = 2) -> str:
    """The run failed with ``code`` and printed exactly one error (no traceback)."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("error:") == 1, res.stderr
    return res.stderr


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDEPLOY_CACHE", str(tmp_path / "cache"))
    return {"SEDEPLOY_CACHE": str(tmp_path / "cache")}


def _model(tmp_path: Path, name: str, nodes, inputs, outputs, inits=()):
    import onnx
    from onnx import helper

    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture
def add_onnx(tmp_path):
    """Not a classifier: one Add whose output is the 4-D image."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])
    c = numpy_helper.from_array(np.ones((1, 3, 32, 32), np.float32), "c")
    return _model(tmp_path, "add", [helper.make_node("Add", ["x", "c"], ["y"])], [x], [y], [c])


def _build(model, out, **kw):
    from sedeploy.build import BuildOptions, build_engines

    return build_engines(model, out, BuildOptions.from_flat(backend="ort", progress=False, **kw))


# ------------------------------------------------------------------------------------------ locking and staging
def test_second_writer_is_refused_while_the_folder_is_locked(tiny_onnx, tmp_path):
    from sedeploy.fsutil import folder_lock

    out = tmp_path / "eng"
    out.mkdir()
    with folder_lock(out, command="build-engine"):
        with pytest.raises(SedeployError, match=r"Another build-engine run is writing into the output folder"):
            _build(tiny_onnx, out)
    assert list(out.iterdir()) == []  # the refused run wrote nothing
    _build(tiny_onnx, out)  # the lock is released with its holder
    assert (out / "manifest.json").is_file()


def test_two_concurrent_cli_builds_never_mix(tiny_onnx, tmp_path, cache_env):
    """Two real processes into one folder: one wins, the other is refused (or runs after it); the manifest lists
    exactly the files present."""
    out = tmp_path / "eng"
    procs = [subprocess.Popen([sys.executable, "-m", "sedeploy", "build-engine", str(tiny_onnx), "-o", str(out),
                               *extra], env={**os.environ, "PYTHONPATH": str(REPO), **cache_env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["--fp16"])]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "is writing into the output folder" in err), (rc, err)
    assert any(rc == 0 for rc, _ in results)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {Path(a["path"]).name for a in manifest["artifacts"]} | \
             {Path(f).name for e in manifest["engines"] for f in e["files"]}
    present = {p.name for p in out.iterdir() if not p.name.startswith(".")} - {"manifest.json"}
    assert listed == present


def test_rebuild_removes_what_the_previous_build_wrote(tiny_onnx, tmp_path, cache_env):
    out = tmp_path / "eng"
    _build(tiny_onnx, out, fp16=True)
    assert (out / "tiny.fp16.onnx").is_file()
    res = _build(tiny_onnx, out)
    names = {p.name for p in out.iterdir()}
    assert "tiny.fp16.onnx" not in names and "tiny.fp16.ort-opt.onnx" not in names
    assert {"tiny.fp32.onnx", "tiny.fp32.ort-opt.onnx", "tiny.fp32.ort.json", "manifest.json"} <= names
    assert any("removed what the previous build wrote" in n for n in res.notes)
    assert not any(p.name.startswith(".sedeploy-staging-") for p in out.iterdir())


def test_rebuild_from_a_symlink_into_the_folder_keeps_its_target(tiny_onnx, tmp_path, cache_env):
    """MODEL given as a link (outside OUT_DIR) to a file of the previous build: that file is the MODEL, so it is
    never removed as "what the previous build wrote" (the link would point at nothing)."""
    out = tmp_path / "eng"
    _build(tiny_onnx, out)
    link = tmp_path / "link.onnx"
    link.symlink_to(out / "tiny.fp32.onnx")
    res = _build(link, out)
    assert (out / "tiny.fp32.onnx").is_file() and link.resolve().is_file()
    assert "tiny.fp32.onnx" not in " ".join(n for n in res.notes if "removed what" in n)


def test_failed_build_leaves_the_previous_set_untouched(tiny_onnx, tmp_path, monkeypatch):
    from sedeploy.build import run

    out = tmp_path / "eng"
    _build(tiny_onnx, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def boom(*a, **k):
        raise SedeployError("FP16 conversion failed (injected).")

    monkeypatch.setattr(run, "fp16_stage", boom)
    with pytest.raises(SedeployError, match="injected"):
        _build(tiny_onnx, out, fp16=True)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # same files, same bytes: the staged fused FP32 model was never published
    assert not [p for p in out.iterdir() if p.is_dir()]


def test_sidecars_and_manifest_point_into_the_output_folder(tiny_onnx, tmp_path):
    out = tmp_path / "eng"
    _build(tiny_onnx, out)
    text = "".join(p.read_text() for p in out.glob("*.json"))
    assert ".sedeploy-staging-" not in text
    side = json.loads((out / "tiny.fp32.ort.json").read_text())
    assert Path(side["source_model"]) == out / "tiny.fp32.onnx"


# ------------------------------------------------------------------------------------------ options checked first
@pytest.mark.parametrize("kw, pattern", [
    ({"calib_count": 0}, r"--calib-count 0 is not valid"),
    ({"calib_batch": -2}, r"--calib-batch -2 is not valid"),
    ({"int8": True, "calib_count": 4}, r"--calib-count 4 is below"),
    ({"threads": 0}, r"--threads 0"),
    ({"min_batch": 0}, r"Batch profile min=0, opt=8, max=32 is not valid"),  # refused with --backend ort too
    ({"threads": 100_000}, r"--threads 100000 is not valid(.|\n)*4 per core"),  # oversubscription, not a value
    ({"workspace_gib": 0.0}, r"--workspace 0.0"),
    ({"keep_fp32": "se,bogus"}, r"Unknown FP32 group"),
    ({"keep_fp32": "head"}, r"--keep-fp32 head chooses what stays FP32.*neither --fp16 nor --int8"),
    ({"int8": True, "calib": "/nonexistent/calib"}, r"calibration image folder \(--calib\) '/nonexistent/calib' "
                                                    r"does not exist"),
])
def test_options_are_checked_before_any_file_is_written(tiny_onnx, tmp_path, kw, pattern):
    out = tmp_path / "eng"
    with pytest.raises(SedeployError, match=pattern):
        _build(tiny_onnx, out, **kw)
    assert not out.exists()


def test_failed_build_removes_the_output_folder_it_created(tiny_onnx, tmp_path, monkeypatch):
    from sedeploy.build import run

    def boom(*a, **k):
        raise SedeployError("simulated failure after the output folder was made")
    monkeypatch.setattr(run, "build_staged", boom)
    with pytest.raises(SedeployError, match="simulated"):
        _build(tiny_onnx, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # made by this run, left empty: removed
    with pytest.raises(SedeployError, match="simulated"):
        _build(tiny_onnx, tmp_path / "a" / "b" / "new")
    assert not (tmp_path / "a").exists()  # so are the parents it made for it
    (tmp_path / "c").mkdir()
    with pytest.raises(SedeployError, match="simulated"):
        _build(tiny_onnx, tmp_path / "c" / "d" / "new")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "d").exists()  # up to the first that was there
    (tmp_path / "mine").mkdir()
    with pytest.raises(SedeployError, match="simulated"):
        _build(tiny_onnx, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # the user's folder stays, even empty


def test_unwritable_calibration_cache_is_named_as_such(tiny_onnx, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("SEDEPLOY_CACHE", str(blocker))
    with pytest.raises(SedeployError) as info:
        _build(tiny_onnx, tmp_path / "eng", int8=True)
    msg = str(info.value)
    assert "calibration cache folder" in msg and "SEDEPLOY_CACHE" in msg and "output directory" not in msg
    assert not (tmp_path / "eng").exists()


def test_calib_cache_that_is_a_folder_is_refused_early(tiny_onnx, tmp_path):
    with pytest.raises(SedeployError, match=r"calibration cache file \(--calib-cache\) '.*' is a folder"):
        _build(tiny_onnx, tmp_path / "eng", int8=True, calib_cache=tmp_path)


def test_calib_errors_name_the_calibration_folder(tiny_onnx, tmp_path):
    empty = tmp_path / "calib"
    empty.mkdir()
    with pytest.raises(SedeployError) as info:
        _build(tiny_onnx, tmp_path / "eng", int8=True, calib=empty)
    assert "calibration image folder (--calib)" in str(info.value)
    assert "verification" not in str(info.value)


# ------------------------------------------------------------------------------------------ signals and partials
_SLOW_BUILD = textwrap.dedent("""
    import sys, time
    from sedeploy.build import run
    from sedeploy.cli import main
    real = run.engines_stage
    def slow(res, stage, opt, **kw):
        real(res, stage, opt, **kw)
        print("READY", flush=True)
        time.sleep(60)
    run.engines_stage = slow
    sys.argv = ["sedeploy", "build-engine", sys.argv[1], "-o", sys.argv[2]]
    main()
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "terminated (SIGHUP)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_stop_cleanly_and_keep_the_previous_set(tiny_onnx, tmp_path, sig, code, word):
    out = tmp_path / "eng"
    _build(tiny_onnx, out)
    manifest = (out / "manifest.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tiny_onnx), str(out)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        staged = [p for p in out.iterdir() if p.name.startswith(".sedeploy-staging-")]
        assert staged and any(staged[0].iterdir())  # the new set exists, but only in staging
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == code, err
    assert word in err and "Traceback" not in err
    assert (out / "manifest.json").read_bytes() == manifest
    assert not [p for p in out.iterdir() if p.name.startswith(".sedeploy-staging-") or p.name.endswith(".partial")]


_SIGNAL_MID_PUBLISH = textwrap.dedent("""
    import os as real_os, signal, sys, threading, time
    from sedeploy import fsutil
    from sedeploy.cli import main
    SIG = int(sys.argv[3])

    class SignalOnFirstPublish:  # fsutil's os (publish_staged), except that its first move out of staging is hit
        # by a signal
        fired = False
        def __getattr__(self, name):
            return getattr(real_os, name)
        def replace(self, src, dst):
            if (not SignalOnFirstPublish.fired and ".sedeploy-staging-" in str(src)
                    and ".sedeploy-staging-" not in str(dst)):  # a move out of staging, not an atomic write in it
                SignalOnFirstPublish.fired = True
                # a worker thread that does not block the signal, as ONNX Runtime's and OpenVINO's do not
                threading.Thread(target=time.sleep, args=(2.0,), daemon=True).start()
                real_os.kill(real_os.getpid(), SIG)
                time.sleep(0.5)  # the signal lands here, between two renames of the publish
            return real_os.replace(src, dst)
    fsutil.os = SignalOnFirstPublish()
    sys.argv = ["sedeploy", "build-engine", sys.argv[1], "-o", sys.argv[2], "--int8"]
    main()
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_during_publish_waits_for_a_complete_set(tiny_onnx, tmp_path, sig, code):
    out = tmp_path / "eng"
    _build(tiny_onnx, out)  # FP32 only: the second build adds INT8 files and removes none
    old = json.loads((out / "manifest.json").read_text())
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_MID_PUBLISH, str(tiny_onnx), str(out), str(int(sig))],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    new = json.loads((out / "manifest.json").read_text())  # the signal waited: the new set is complete
    assert new != old and any("int8" in json.dumps(a) for a in new["artifacts"])
    listed = {Path(a["path"]).name for a in new["artifacts"]} | {Path(e["path"]).name for e in new["engines"]}
    assert listed and all((out / name).is_file() for name in listed)
    assert not [p for p in out.iterdir() if p.name.startswith(".sedeploy-staging-") or p.name.endswith(".partial")]


def test_stale_partials_of_killed_runs_are_removed_by_the_next_build(tiny_onnx, tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    old = time.time() - 3600
    stale = out / ".tiny.fp32.onnx.k3j_x9q2.partial"  # what atomic_path names its temporary files
    stale_stage = out / ".sedeploy-staging-abc123"
    keep = [out / "notes.partial", out / ".config.partial", out / "user.onnx"]  # not sedeploy's pattern
    for p in [stale, *keep]:
        p.write_bytes(b"x" * 10)
        os.utime(p, (old, old))
    stale_stage.mkdir()
    (stale_stage / "tiny.fp32.onnx").write_bytes(b"half")
    _build(tiny_onnx, out)
    assert not stale.exists() and not stale_stage.exists()
    assert all(p.exists() for p in keep)


def test_partial_younger_than_the_run_is_kept(tmp_path):
    from sedeploy.fsutil import clean_stale_partials

    start = time.time() - 60
    young = tmp_path / ".x.onnx.abcdefgh.partial"
    young.write_bytes(b"")  # mtime now: another live run may be writing it
    old = tmp_path / ".y.onnx.abcdefgh.partial"
    old.write_bytes(b"")
    os.utime(old, (start - 10, start - 10))
    assert clean_stale_partials(tmp_path, older_than=start) == [old]
    assert young.exists()


# ------------------------------------------------------------------------------------------ disk full
def test_disk_full_is_one_clear_error_and_leaves_nothing(tmp_path):
    from sedeploy.fsutil import atomic_path

    final = tmp_path / "model.onnx"
    with pytest.raises(SedeployError) as info:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    msg = str(info.value)
    assert "disk is full" in msg and "--opset" not in msg and "free some space" in msg
    assert list(tmp_path.iterdir()) == []


def test_disk_full_names_the_file_the_user_asked_for(tmp_path):
    from sedeploy.fsutil import disk_full_error, user_path

    assert user_path(tmp_path / ".m.onnx.ab_d1234.partial") == tmp_path / "m.onnx"
    assert user_path(tmp_path / ".sedeploy-staging-x1y2z3ab" / "m.fp32.onnx") == tmp_path / "m.fp32.onnx"
    assert f"'{tmp_path / 'm.onnx'}'" in str(disk_full_error(tmp_path / ".m.onnx.ab_d1234.partial"))


def test_disk_full_inside_the_exporter_is_not_blamed_on_the_opset(tiny_model, tmp_path, monkeypatch):
    import torch

    from sedeploy.export import export_onnx

    def full(*a, **k):
        raise RuntimeError("serialization failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    with pytest.raises(SedeployError, match="disk is full") as info:
        export_onnx(tiny_model, tmp_path / "m.onnx", input_size=32)
    assert "--opset" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_turns_an_escaped_enospc_into_exit_2(monkeypatch, capsys):
    from sedeploy.cli import handle_errors

    @handle_errors
    def writes():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.onnx")

    with pytest.raises(SystemExit) as info:
        writes()
    assert info.value.code == 2
    assert "disk is full" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ image folders
def _jpeg(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_fifo_dangling_and_looping_links_are_skipped_without_blocking(tmp_path, caplog):
    from sedeploy.preprocess import find_images, load_folder

    _jpeg(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "loop1.jpg").symlink_to(tmp_path / "loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to(tmp_path / "loop1.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")  # a link to a real file is an image
    found = find_images(tmp_path)
    assert [p.name for p in found.paths] == ["a.jpg", "link.jpg"]
    reasons = dict((p.name, why) for p, why in found.not_files)
    assert "FIFO" in reasons["pipe.jpg"] and "broken symbolic link" in reasons["dangling.jpg"]
    assert "loop" in reasons["loop1.jpg"]
    assert "pipe.jpg" in caplog.text
    x, loaded = load_folder(tmp_path)  # returns at once: the FIFO is never opened
    assert x.shape[0] == 2


def test_folder_of_only_broken_entries_is_one_error(tmp_path):
    from sedeploy.preprocess import find_images

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(SedeployError, match="contains no images"):
        find_images(tmp_path, what="calibration image folder")


def test_calibration_with_a_dangling_link_in_the_folder(tiny_onnx, tmp_path, calib_dir):
    from sedeploy.quantize import calibrate

    folder = tmp_path / "calib"
    folder.mkdir()
    for i, src in enumerate(sorted(calib_dir.glob("*.jpg"))[:16]):
        (folder / f"{i:02d}.jpg").write_bytes(src.read_bytes())
    (folder / "zz.jpg").symlink_to(folder / "gone.jpg")
    os.mkfifo(folder / "zz-pipe.jpg")
    from sedeploy.preprocess import Preprocess

    res = calibrate(tiny_onnx, folder, cache_dir=tmp_path / "cache", progress=False,
                    preprocess=Preprocess.for_size(32))
    assert len(res.images) == 16


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path, fmt):
    """A 16-bit PNG opens as mode I;16 and a 32-bit-int TIFF as mode I; PIL's convert("RGB") clips both at 255
    (measured: 98 % of this ramp turns white). sedeploy scales them to 8 bits."""
    from PIL import Image

    from sedeploy.preprocess import Preprocess, load_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # dark … bright
    path = tmp_path / f"g16.{fmt}"
    Image.fromarray(ramp if fmt == "png" else ramp.astype(np.int32)).save(path)
    with Image.open(path) as im:
        assert im.mode == ("I;16" if fmt == "png" else "I")
    eight = tmp_path / "g8.png"
    Image.fromarray((ramp // 257).astype(np.uint8), "L").save(eight)
    pp = Preprocess(size=64, resize_short=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    got, want = load_image(path, pp), load_image(eight, pp)
    assert np.abs(got - want).max() <= 1.0  # the same picture as its 8-bit version
    assert (got >= 254).mean() < 0.05  # not "nearly all white"


# ------------------------------------------------------------------------------------------ models
def test_non_classifier_is_refused_by_build_engine_and_bench(add_onnx, tmp_path):
    err = one_error(cli("build-engine", add_onnx, "-o", tmp_path / "eng"))
    assert "not an image classifier" in err
    assert not (tmp_path / "eng").exists()
    err = one_error(cli("bench", add_onnx, "--no-probe", "--no-torch-baseline", "--repeats", 3))
    assert "not an image classifier" in err


def test_one_channel_and_uint8_input_models_are_refused(tmp_path):
    from onnx import TensorProto, helper

    x1 = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])
    y1 = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    gray = _model(tmp_path, "gray", [helper.make_node("Flatten", ["x"], ["y"])], [x1], [y1])
    xu = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 32, 32])
    yu = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    u8 = _model(tmp_path, "u8", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], [xu], [yu])
    assert "1 channel(s)" in one_error(cli("build-engine", gray, "-o", tmp_path / "e1"))
    assert "is uint8" in one_error(cli("build-engine", u8, "-o", tmp_path / "e2"))
    assert "1 channel(s)" in one_error(cli("bench", gray, "--no-probe"))


def test_output_without_a_declared_shape_is_inferred(tmp_path):
    from flatten_model import flatten_classifier

    src = flatten_classifier(tmp_path / "noshape.onnx", declare_output=False)
    res = _build(src, tmp_path / "eng")
    assert res.shapes["output"] and res.engines


def test_float16_input_to_float32_compute_is_refused_as_such(tmp_path):
    from flatten_model import flatten_classifier
    from sedeploy.artifacts import Artifact

    src = flatten_classifier(tmp_path / "half_in.onnx", fp16_input=True)
    assert Artifact.from_file(src).precision == "fp32"  # precision is the compute's, not the input's dtype
    err = one_error(cli("build-engine", src, "-o", tmp_path / "eng", "--backend", "ort"))
    assert "input 'x' is float16" in err and "float32" in err and "Fix:" in err
    assert "already an FP16" not in err and not (tmp_path / "eng").exists()


def test_one_output_model_is_refused_with_a_fix(tmp_path):
    from flatten_model import flatten_classifier

    src = flatten_classifier(tmp_path / "one.onnx", classes=1)
    err = one_error(cli("build-engine", src, "-o", tmp_path / "eng"))
    assert "1 output class" in err and "Fix:" in err


def test_normalisation_error_names_the_channel_order_given(tmp_path):
    from flatten_model import flatten_classifier

    src = flatten_classifier(tmp_path / "m.onnx")
    err = one_error(cli("build-engine", src, "-o", tmp_path / "eng", "--channel-order", "bgr", "--std", "1,2"))
    assert "(B,G,R)" in err and "R,G,B" not in err
    err = one_error(cli("build-engine", src, "-o", tmp_path / "eng", "--std", "1,2"))
    assert "(R,G,B)" in err


def test_warnings_print_once_as_warnings_in_the_summary():
    from sedeploy.build.result import BuildResult, format_result

    res = BuildResult(source="m.onnx", out_dir="eng", notes=["WARNING: INT8 agreement not measured", "plain"])
    text = format_result(res)
    assert "warning: INT8 agreement not measured" in text and "note: plain" in text
    assert "WARNING" not in text


def test_inspect_of_an_empty_file_fails(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty file" in one_error(cli("inspect", empty))


# ------------------------------------------------------------------------------------------ CLI option values
@pytest.mark.parametrize("size", ["0", "-1", "100000"])
def test_info_input_size_out_of_range(size):
    err = one_error(cli("info", "--input-size", size))
    assert f"--input-size {size} is not valid" in err


def test_export_num_classes_zero_is_refused_not_a_1000_class_model(tmp_path):
    err = one_error(cli("export", "--depth", 18, "--num-classes", 0, "-o", tmp_path / "m.onnx"))
    assert "--num-classes 0 is not valid" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_negative_atol_is_an_input_error_not_a_bug(tmp_path):
    err = one_error(cli("export", "--depth", 18, "--atol", -1, "-o", tmp_path / "m.onnx"))
    assert "--atol -1.0 is not valid" in err and "bug" not in err


def test_checkpoint_depth_is_used_when_depth_is_not_given(tmp_path):
    import torch

    from sedeploy.export import export_model
    from sedeploy.model import build_model

    ckpt = tmp_path / "r34.pth"
    torch.save(build_model(34, num_classes=10, seed=1, base_channels=8).state_dict(), ckpt)
    with pytest.raises(SedeployError, match="you asked for --depth 50"):
        export_model(depth=50, checkpoint=str(ckpt), output=tmp_path / "a.onnx", input_size=32, verify_limit=2)
    res = export_model(checkpoint=str(ckpt), output=tmp_path / "b.onnx", input_size=32, verify_limit=2)
    assert res.depth == 34 and res.num_classes == 10


def test_malicious_pickle_is_called_what_it_is(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    from sedeploy.checkpoints import load_checkpoint

    with pytest.raises(SedeployError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "pickled Python objects" in msg and "arbitrary code" in msg and "corrupt" not in msg


# ------------------------------------------------------------------------------------------ labels
def _labels_setup(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        _jpeg(root / name)
    return root


def test_labels_file_not_utf8_is_one_error(tmp_path):
    from sedeploy.labels import read_labels_file

    p = tmp_path / "labels.tsv"
    p.write_bytes("a.jpg\t1\ncaf\xe9.jpg\t2\n".encode("latin-1"))
    with pytest.raises(SedeployError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_labels_file(p)


def test_superscript_label_is_refused_not_a_traceback(tmp_path):
    from sedeploy.labels import resolve_labels

    root = _labels_setup(tmp_path)
    p = tmp_path / "labels.tsv"
    p.write_text("a.jpg\t1\nb.jpg\t²\n", encoding="utf-8")
    with pytest.raises(SedeployError, match="neither a class index nor a synset"):
        resolve_labels(sorted(root.glob("*.jpg")), root, num_classes=10, labels_file=p)


def test_labels_path_that_is_a_folder_says_so(tmp_path):
    from sedeploy.classes import read_synset_table
    from sedeploy.labels import read_labels_file

    with pytest.raises(SedeployError, match="is a folder"):
        read_labels_file(tmp_path)
    with pytest.raises(SedeployError, match="is a folder"):
        read_synset_table(tmp_path)


# ------------------------------------------------------------------------------------------ the three card commands
def test_bare_bench_uses_engines_folder_and_says_so(tiny_onnx, tmp_path, cache_env):
    res = cli("bench", "--no-probe", "--no-torch-baseline", cwd=tmp_path, env=cache_env)
    err = one_error(res)
    assert "default folder 'engines/'" in err and "sedeploy build-engine" in err
    assert "out/model.fp32.onnx" not in err
    built = cli("build-engine", tiny_onnx, "--backend", "ort", cwd=tmp_path, env=cache_env)  # → engines/
    assert built.returncode == 0, built.stderr
    res = cli("bench", "--no-probe", "--no-torch-baseline", "--repeats", 3, "--batch", "1,2", cwd=tmp_path,
              env=cache_env)
    assert res.returncode == 0, res.stderr
    assert "benchmarking engines/" in res.stderr
    assert "tiny.fp32.ort-opt" in res.stdout


def test_build_engine_summary_and_bench_table_show_the_weights(tmp_path, cache_env):
    from sedeploy.bench.tables import to_markdown
    from sedeploy.bench.run import run_bench
    from sedeploy.export import export_model
    from sedeploy.build import format_result

    model = export_model(depth=18, output=tmp_path / "m.onnx", input_size=32, verify_limit=2, base_channels=8)
    res = _build(model.path, tmp_path / "eng")
    assert "weights     random (seed 0)" in format_result(res)
    bench = run_bench([tmp_path / "eng"], batches=[1], repeats=3, warmup=1, probe=False, torch_baseline=False,
                      progress=False)
    assert "Weights: random (seed 0)" in to_markdown(bench)


def test_calibration_cache_hit_reports_this_runs_time(tiny_onnx, tmp_path, calib_dir):
    from sedeploy.build import format_result

    first = _build(tiny_onnx, tmp_path / "a", int8=True, calib=calib_dir, calib_cache=tmp_path / "c.json")
    again = _build(tiny_onnx, tmp_path / "b", int8=True, calib=calib_dir, calib_cache=tmp_path / "c.json")
    assert not first.calibration["cache_hit"] and again.calibration["cache_hit"]
    assert again.calibration["seconds"] == again.timings["calibrate_s"]
    assert "computed_seconds" not in first.calibration and again.calibration["computed_seconds"] > 0
    assert "cache hit" in format_result(again) and "computed in" in format_result(again)


# ------------------------------------------------------------------------------------------ progress and plots
def test_no_progress_bars_when_stderr_is_not_a_terminal(tiny_onnx, tmp_path, cache_env):
    res = cli("build-engine", tiny_onnx, "--int8", "-o", tmp_path / "eng", env=cache_env)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "it/s" not in res.stderr and "batch/s" not in res.stderr


def test_bench_timing_shows_progress_when_asked(tiny_onnx, tmp_path, capsys):
    from sedeploy.bench.run import run_bench

    _build(tiny_onnx, tmp_path / "eng")
    run_bench([tmp_path / "eng"], batches=[1, 2], repeats=4, warmup=1, probe=False, torch_baseline=False,
              progress=True)
    assert "Timing batch 2" in capsys.readouterr().err
    run_bench([tmp_path / "eng"], batches=[1], repeats=2, warmup=1, probe=False, torch_baseline=False,
              progress=False)
    assert "Timing" not in capsys.readouterr().err


def _fake_results(gflops: list[float]) -> dict:
    engines = []
    for i, (name, prec, g) in enumerate(zip(["m.fp32.ort-opt", "m.int8-cpu.ort-opt", "n.fp32.ort-opt"],
                                            ["fp32", "int8", "fp32"], gflops)):
        lat = {k: 2.0 + i for k in ("p10", "p50", "p90")}
        engines.append({"name": name, "model": "SE-ResNet-50", "precision": prec, "flavour": "ort-opt",
                        "gflops_total": g, "batch": {b: {"throughput": 100.0 * (i + 1) * int(b), "latency_ms": lat}
                                                    for b in ("1", "8")}})
    return {"engines": engines, "complete": True, "ceilings": {"fp32": {"per_s": 5e4}}}


def test_throughput_plot_of_one_model_is_one_bar_per_engine():
    from sedeploy.bench.plots import engine_colors, latency_figure, throughput_figure

    results = _fake_results([8.2, 8.2])
    fig = throughput_figure(results)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == ["m.fp32.ort-opt", "m.int8-cpu.ort-opt"]  # unique names, no duplicate labels
    bars = {lab: patch for lab, patch in zip(labels, ax.patches)}
    lines = {ln.get_label(): ln for ln in latency_figure(results).axes[0].get_lines()}
    from matplotlib.colors import to_rgba

    for name, color in engine_colors(results).items():
        if name in bars:  # the same colour for an engine in both plots
            assert bars[name].get_facecolor() == to_rgba(color) == to_rgba(lines[name].get_color())


def test_throughput_plot_of_several_models_keeps_flop_axis():
    from sedeploy.bench.plots import throughput_figure

    ax = throughput_figure(_fake_results([8.2, 8.2, 15.6])).axes[0]
    assert ax.get_xscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"m.fp32.ort-opt", "m.int8-cpu.ort-opt", "n.fp32.ort-opt"} <= set(legend)


@pytest.mark.slow
def test_the_three_card_commands_as_typed(tmp_path, cache_env):
    """README card: `sedeploy export --depth 50`, `sedeploy build-engine --int8 --calib calib/`, `sedeploy bench`
    in a fresh folder (the bench here with fewer repeats and one batch size, to keep the test short)."""
    import shutil

    shutil.copytree(REPO / "calib", tmp_path / "calib")
    res = cli("export", "--depth", 50, cwd=tmp_path, env=cache_env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "se-resnet50.onnx").is_file()
    res = cli("build-engine", "--int8", "--calib", "calib/", cwd=tmp_path, env=cache_env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "using the existing export se-resnet50.onnx" in res.stderr  # said, and no second export
    assert "export_s" not in json.loads((tmp_path / "engines" / "manifest.json").read_text())["timings"]
    assert "weights     random (seed 0)" in res.stdout
    res = cli("bench", "--batch", "1", "--repeats", 3, "--no-probe", "--no-torch-baseline", cwd=tmp_path,
              env=cache_env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "benchmarking engines/" in res.stderr
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    int8 = [Path(e["path"]).name for e in manifest["engines"] if e["precision"] == "int8"]  # backend auto decides
    assert int8 and all(name.removesuffix(".onnx") in res.stdout for name in int8), (int8, res.stdout)
    assert "Weights: random (seed 0)" in res.stdout


@pytest.mark.slow
def test_build_engine_without_model_says_it_exports(tmp_path, cache_env):
    res = cli("build-engine", "--depth", 18, "--backend", "none", cwd=tmp_path, env=cache_env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "no matching export found: exporting se-resnet18" in res.stderr
    assert (tmp_path / "engines" / "se-resnet18.onnx").is_file()  # published with the set
    assert "exported se-resnet18 (random (seed 0))" in res.stdout


def test_export_removes_its_own_abandoned_partials_only(tmp_path):
    from sedeploy.export import export_model

    hour_ago = time.time() - 3600
    abandoned = tmp_path / ".m.onnx.abcd1234.partial"
    recent = tmp_path / ".m.onnx.wxyz5678.partial"  # may belong to a live run: kept
    other = tmp_path / ".other.onnx.abcd1234.partial"  # another file's: kept
    for p in (abandoned, recent, other):
        p.write_bytes(b"x")
    for p in (abandoned, other):
        os.utime(p, (hour_ago, hour_ago))
    export_model(depth=18, base_channels=8, input_size=32, output=tmp_path / "m.onnx", verify_limit=2)
    assert not abandoned.exists() and recent.exists() and other.exists()


_SIGNALS_HELD = textwrap.dedent("""
    import signal
    from sedeploy.fsutil import signals_held

    got = []
    for sig, name in ((signal.SIGTERM, "term"), (signal.SIGHUP, "hup"), (signal.SIGINT, "int")):
        signal.signal(sig, lambda signum, frame, name=name: got.append(name))
    mine = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # a signal noted during a block that then fails: the block's own error comes out, the signal is dropped
    try:
        with signals_held():
            signal.raise_signal(signal.SIGTERM)  # noted, not acted on
            raise OSError("disk full")
    except OSError as err:
        print("error:", err)
    print("after failure:", got, (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == mine)
    # signals noted during a block that finishes are raised once it is done, SIGTERM first
    with signals_held():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGTERM)
        got.append("inside")
    print("after success:", got)
    # a handler installed outside Python (getsignal() is None) cannot be restored: the mask is used instead
    swapped, real_signal = [], signal.signal
    signal.getsignal = lambda sig: None
    signal.signal = lambda *a: swapped.append(a) or real_signal(*a)
    with signals_held():
        pass
    print("swapped:", swapped)
""")


def test_signals_held_keeps_a_failing_blocks_own_error_and_respects_foreign_handlers():
    # in a process of its own: a test runner's worker may hold signal handlers or masks of its own
    proc = subprocess.run([sys.executable, "-c", _SIGNALS_HELD], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["error: disk full", "after failure: [] True",
                                        "after success: ['inside', 'term', 'hup', 'int']", "swapped: []"], proc.stdout


def test_disk_full_in_libraries_that_lose_the_errno(tiny_onnx, tmp_path, monkeypatch):
    """OpenVINO's save_model and ONNX Runtime's optimized-model write fail on a full disk without an errno
    ("basic_ios::clear: iostream error", a protobuf error). With the disk short of space, either becomes the one
    disk-full error; with space left, a real failure is named as the library's error, never as a full disk."""
    from sedeploy import fsutil
    from sedeploy.backends.ort import build_ort_engine

    real = os.statvfs

    def statvfs(path, free=0):
        st = real(path)
        return type("St", (), {"f_bavail": free // st.f_frsize, "f_frsize": st.f_frsize})()

    monkeypatch.setattr(fsutil.os, "statvfs", statvfs)
    assert fsutil.short_of_space(tmp_path, 1) is True
    out = tmp_path / "ort"
    import onnxruntime as ort

    class Failing:
        def __init__(self, *a, **k):
            raise ort.capi.onnxruntime_pybind11_state.InvalidProtobuf("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF")

    monkeypatch.setattr(ort, "InferenceSession", Failing)
    with pytest.raises(SedeployError, match="disk is full"):
        build_ort_engine(tiny_onnx, out)
    monkeypatch.setattr(fsutil.os, "statvfs", lambda p: statvfs(p, free=2**40))
    with pytest.raises(SedeployError, match="ONNX Runtime could not load") as info:
        build_ort_engine(tiny_onnx, out)
    assert "disk is full" not in str(info.value)
    assert not [p for p in out.iterdir() if not p.name.startswith(".sedeploy-write-test")]


def test_openvino_save_model_on_a_full_disk(tiny_onnx, tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino", reason="the 'openvino' package is not installed (pip install "
                                                "'sedeploy[openvino]')")
    from sedeploy.backends.openvino import build_engine

    def save_model(*a, **k):
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp:1402:\nbasic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", save_model)
    from sedeploy.backends import openvino as OVB

    monkeypatch.setattr(OVB, "short_of_space", lambda folder, need: True)
    with pytest.raises(SedeployError, match="disk is full"):
        build_engine(tiny_onnx, tmp_path / "ov")
    monkeypatch.setattr(OVB, "short_of_space", lambda folder, need: False)
    with pytest.raises(SedeployError, match="could not save the IR .*iostream error"):
        build_engine(tiny_onnx, tmp_path / "ov")
    assert not [p for p in (tmp_path / "ov").iterdir() if p.suffix in (".xml", ".bin", ".json")]


# ------------------------------------------------------------------------------------------ serving: package, labels
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_package_never_replaces_the_engines_or_the_users_files(tiny_onnx, tmp_path):
    """-o at, inside or around the engines folder, a file, or a folder that is not a previous repository: one
    error each (exit 2), even with --force, and nothing of the user's is touched."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'sedeploy[serve]')")
    eng = tmp_path / "eng"
    _build(tiny_onnx, eng)
    before = _tree(eng)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("keep")
    for out, needle in ((eng, "is the engines folder"), (eng / "repo", "is inside the engines folder"),
                        (tmp_path, "contains the engines folder"), (mine, "is not a folder"),
                        (other, "not a sedeploy Triton repository")):
        err = one_error(cli("package", eng, "-o", out, "--force"))
        assert needle in err, err
    assert _tree(eng) == before and mine.read_text() == "mine" and (other / "a.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    repo = tmp_path / "repo"
    assert cli("package", eng, "-o", repo).returncode == 0
    assert "replace it" in one_error(cli("package", eng, "-o", repo))
    res = cli("package", eng, "-o", repo, "--force", "--max-batch", "4")
    assert res.returncode == 0, res.stderr
    assert "max_batch_size: 4" in (repo / "tiny_fp32_ort" / "config.pbtxt").read_text()


def test_package_interrupted_while_publishing_keeps_the_previous_repository(tiny_onnx, tmp_path, monkeypatch):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'sedeploy[serve]')")
    from sedeploy.serving import triton_repo

    eng, repo = tmp_path / "eng", tmp_path / "repo"
    _build(tiny_onnx, eng)
    triton_repo.package_triton(eng, repo)
    before = _tree(repo)
    real = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".repo.staging-"):  # Ctrl-C between moving the old one aside and the rename
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(triton_repo.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        triton_repo.package_triton(eng, repo, force=True, max_batch=4)
    assert _tree(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng", "repo"]  # no staging or set-aside copy left


def test_class_names_tables_and_what_is_refused(tmp_path):
    from sedeploy.classes import read_class_names

    words = tmp_path / "synset_words.txt"
    words.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    table = tmp_path / "table.tsv"
    table.write_text("index\tsynset\tname\n1\tn01443537\tgoldfish\n0\tn01440764\ttench\n")
    plain = tmp_path / "labels.txt"
    plain.write_text("tench\ngoldfish\n")
    for p in (words, table, plain):
        assert read_class_names(p) == ["tench", "goldfish"], p
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07\x12\x00binary\x00")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    gap = tmp_path / "gap.tsv"
    gap.write_text("0\tn01440764\ttench\n2\tn01443537\tgoldfish\n")
    for p, needle in ((model, "not a text file"), (latin, "not UTF-8"), (gap, "missing: 1"),
                      (tmp_path, "is a folder"), (tmp_path / "none.txt", "does not exist")):
        with pytest.raises(SedeployError, match=needle):
            read_class_names(p)


# ------------------------------------------------------------------------------ foreign models: one clear error, early
def _foreign(path: Path, *, batch="N", opset=17, reshape_batch=None, nan=False, zero_classes=False, pad_chain=False,
             node=None, domain=None, seed=0) -> Path:
    """A small classifier as other exporters write one: Conv → Relu → Conv → Relu → GlobalAveragePool →
    Reshape → Gemm, 3×16×16 input, random (non-degenerate) weights; each keyword adds one foreign trait."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)

    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("w2", 8, 8, 3, 3), w("b2", 8), w("fw", 10, 8), w("fb", 10),
             numpy_helper.from_array(np.array([reshape_batch or -1, 8], np.int64), "shape")]
    if nan:
        inits[1] = numpy_helper.from_array(np.full(8, np.nan, np.float32), "b1")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    first = "r1"
    if pad_chain:  # the TorchScript exporter's TF-"same" padding: an int64 pad vector computed at run time
        nodes += [helper.make_node("Constant", [], ["n6"], value=numpy_helper.from_array(np.array([6], np.int64))),
                  helper.make_node("ConstantOfShape", ["n6"], ["z6"],
                                   value=numpy_helper.from_array(np.zeros(1, np.int64))),
                  helper.make_node("Constant", [], ["hw"], value=numpy_helper.from_array(np.array([1, 1], np.int64))),
                  helper.make_node("Concat", ["z6", "hw"], ["pads"], axis=0, name="pad_concat"),
                  helper.make_node("Pad", ["r1", "pads"], ["padded"], name="pad")]
        first = "padded"
    nodes += [helper.make_node("Conv", [first, "w2", "b2"], ["c2"], pads=[0, 0, 0, 0] if pad_chain else [1, 1, 1, 1],
                               kernel_shape=[2, 2] if pad_chain else [3, 3], name="conv2"),
              helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
              helper.make_node("Reshape", ["p", "shape"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["g" if zero_classes else "y"], transB=1, name="fc")]
    if pad_chain:
        inits[2] = w("w2", 8, 8, 2, 2)
    classes = 10
    if zero_classes:  # a Slice that keeps no class
        inits += [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("s0", 0), ("s1", 0), ("ax", 1))]
        nodes.append(helper.make_node("Slice", ["g", "s0", "s1", "ax"], ["y"], name="slice"))
        classes = 0
    if node is not None:
        nodes.insert(2, node)
    g = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(g, opset_imports=opsets), path)
    return path


def test_an_int64_pad_chain_gets_no_calibration_range_and_the_model_builds(tmp_path, calib_dir, cache_env):
    """EfficientNet-Lite's unfolded pad arithmetic: folded away before any pass; calibration never asks for a
    range of an integer or constant tensor, even on the graph as exported."""
    import onnx

    from sedeploy.quantize import activation_tensors

    model = _foreign(tmp_path / "padded.onnx", pad_chain=True)
    acts = set(activation_tensors(onnx.load(model)))
    assert {"x", "c1", "r1", "padded", "y"} <= acts and not {"pads", "z6", "hw", "n6", "shape"} & acts
    res = _build(model, tmp_path / "out", fp16=True, int8=True, calib=calib_dir, calib_count=16)
    assert res.canonical["changed"] and res.canonical["removed"]["Pad"] == 1
    assert res.canonical["max_abs_diff_vs_input"] <= res.canonical["tolerance"]
    fp32 = onnx.load(next(a.path for a in res.artifacts if a.kind == "fp32"))
    assert {n.op_type for n in fp32.graph.node} == {"Conv", "Relu", "GlobalAveragePool", "Reshape", "Gemm"}


@pytest.mark.parametrize("trait,message", [
    (dict(node="if"), r"holds control flow: If 'branch'"),
    (dict(domain="acme.ops"), r"uses operator\(s\) outside the standard ONNX domain: acme.ops::Fancy"),
    (dict(reshape_batch=1), r"declares a dynamic batch but fails on a batch of \d+ images \(it runs at batch 1\)"),
    (dict(nan=True), r"itself outputs NaN/inf on \d+ of \d+ check images \(before any sedeploy pass\)"),
    (dict(zero_classes=True), r"outputs shape \[\d+, 0\]"),
])
def test_foreign_model_faults_are_one_clear_error_before_any_pass(tmp_path, cache_env, trait, message):
    """Each is refused before fusion and calibration, naming the user's file (never the staging folder)."""
    from onnx import TensorProto, helper

    if trait.get("node") == "if":
        branch = lambda name: helper.make_graph(  # noqa: E731
            [helper.make_node("Identity", ["r1"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
        cond = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0, name="mx"),
                helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
                helper.make_node("Greater", ["mx", "zero"], ["cond"], name="gt")]
        model = _foreign(tmp_path / "m.onnx", node=helper.make_node("If", ["cond"], ["r1b"], name="branch",
                                                                   then_branch=branch("t"), else_branch=branch("e")))
        import onnx

        proto = onnx.load(model)  # the If's condition comes first; conv2 reads the If's output
        nodes = list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes[:2] + cond + nodes[2:])
        next(n for n in proto.graph.node if n.name == "conv2").input[0] = "r1b"
        onnx.save(proto, model)
    elif "domain" in trait:
        model = _foreign(tmp_path / "m.onnx", domain=trait["domain"],
                         node=helper.make_node("Fancy", ["r1"], ["r1f"], domain=trait["domain"], name="fancy"))
        import onnx

        proto = onnx.load(model)
        next(n for n in proto.graph.node if n.name == "conv2").input[0] = "r1f"
        onnx.save(proto, model)
    else:
        model = _foreign(tmp_path / "m.onnx", **trait)
    res = cli("build-engine", model, "--int8", "--backend", "ort", "--calib-method", "minmax", "--calib-count", "4",
              "-o", tmp_path / "out", env=cache_env)
    err = one_error(res)
    assert re.search(rf"'{re.escape(str(model))}' {message}", err), err
    assert "staging" not in err and "Calibrating" not in res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_inconsistent_shapes_and_missing_external_data_are_named(tmp_path, cache_env):
    import onnx

    model = _foreign(tmp_path / "m.onnx")
    proto = onnx.load(model)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7  # the Gemm makes 10 classes
    onnx.save(proto, tmp_path / "shapes.onnx")
    err = one_error(cli("build-engine", tmp_path / "shapes.onnx", "--backend", "none", "-o", tmp_path / "o1",
                        env=cache_env))
    assert f"ONNX shape inference rejects '{tmp_path / 'shapes.onnx'}'" in err
    (tmp_path / "ext").mkdir()
    onnx.save(onnx.load(model), tmp_path / "ext" / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    os.replace(tmp_path / "ext" / "m.onnx", tmp_path / "moved.onnx")  # moved without its data file
    err = one_error(cli("build-engine", tmp_path / "moved.onnx", "--backend", "none", "-o", tmp_path / "o2",
                        env=cache_env))
    assert "keeps its weights in external data file(s) that are not beside it" in err and "m.onnx.data" in err


def test_an_old_opset_is_converted_and_a_static_batch_4_model_builds_fp16_and_int8(tmp_path, calib_dir, cache_env):
    """Opset 9 is converted to the minimum supported opset up front; a fixed batch of 4 is fed its batch in every
    smoke run (FP16 overflow check, INT8 checks)."""
    from sedeploy.passes.canonical import MIN_OPSET

    old = _build(_foreign(tmp_path / "old.onnx", opset=9), tmp_path / "o1", int8=True, calib=calib_dir,
                 calib_count=16)
    assert old.canonical["opset_before"] == 9 and old.canonical["opset_after"] == MIN_OPSET
    assert any(f"opset 9 → {MIN_OPSET}" in n for n in old.notes)
    res = _build(_foreign(tmp_path / "b4.onnx", batch=4), tmp_path / "o2", fp16=True, int8=True, calib=calib_dir,
                 calib_count=16)
    assert res.shapes["static_batch"] == 4
    assert {a.kind for a in res.artifacts} >= {"fp32", "fp16", "int8-trt", "int8-cpu"}


def test_errors_name_sedeploy_intermediates_as_such(tmp_path):
    from sedeploy.build.publish import name_intermediates

    stage = tmp_path / ".sedeploy-staging-abc"
    err = SedeployError(f"Quantizing '{stage}/m.fp32.onnx' failed.", fix="x")
    name_intermediates(err, stage, "models/m.onnx")
    assert str(stage) not in str(err) and "m.fp32.onnx (sedeploy's intermediate from 'models/m.onnx')" in str(err)
    assert err.what == "Quantizing 'm.fp32.onnx (sedeploy's intermediate from 'models/m.onnx')' failed."


@pytest.mark.slow
def test_an_unmeetable_agreement_budget_is_the_budgets_verdict_not_an_empty_quantization(tiny_onnx, tmp_path,
                                                                                          calib_dir, monkeypatch):
    """With every weighted layer in float there is no INT8 model left: the fallback search stops one layer short
    and reports the budget it could not meet (exit 3), instead of the quantizer's "quantized no operator"."""
    from sedeploy import int8_budget
    from sedeploy.quantize import calibrate
    from sedeploy.errors import VerificationError
    from sedeploy.preprocess import Preprocess, load_folder

    real = int8_budget.metrics
    monkeypatch.setattr(int8_budget, "metrics", lambda ref, got, labels: {
        **real(ref, got, labels), "agreement_pct": 0.0, "agreement_lcb_pct": 0.0})  # never within any budget
    pp = Preprocess.for_size(32)
    calib = calibrate(tiny_onnx, calib_dir, method="minmax", count=8, preprocess=pp, use_cache=False,
                      progress=False)
    images, _ = load_folder(calib_dir, pp, limit=16, what="images")
    with pytest.raises(VerificationError, match=r"cannot meet the budget .* weighted layers in float") as err:
        int8_budget.quantize_to_budget(tiny_onnx, calib, tmp_path / "m.int8-cpu.onnx", flavour="cpu",
                                       images=images, budget=int8_budget.Budget(min_agreement=97.0),
                                       sensitivity_images=4, time_speed=False)
    assert "quantized no operator" not in str(err.value)
    assert not (tmp_path / "m.int8-cpu.onnx").exists()


def test_calibration_refuses_a_model_that_itself_outputs_nan(tmp_path, calib_dir):
    """NaN/inf in the FP32 model's own output on calibration images: the model's problem, named with the images
    (not non-finite ranges to 'recalibrate' later)."""
    from sedeploy.quantize import calibrate
    from sedeploy.preprocess import Preprocess

    model = _foreign(tmp_path / "nan.onnx", nan=True)
    with pytest.raises(SedeployError, match=r"'.*nan.onnx' itself outputs NaN/inf on calibration image\(s\) \S+\.jpg"):
        calibrate(model, calib_dir, method="minmax", count=4, preprocess=Preprocess.for_size(16), use_cache=False,
                  progress=False)


_SLOW_BENCH = textwrap.dedent("""
    import sys, time
    from sedeploy.bench import run
    from sedeploy.cli import main
    real = run.time_runners
    def slow(*a, **k):
        print("READY", flush=True)
        time.sleep(60)
        return real(*a, **k)
    run.time_runners = slow
    sys.argv = ["sedeploy", "bench", sys.argv[1], "--out", sys.argv[2], "--no-probe", "--no-torch-baseline",
                "--batch", "1", "--repeats", "3", "--warmup", "1"]
    main()
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_bench_stopped_by_a_signal_publishes_partial_results_whole(tiny_onnx, tmp_path, sig, code, word):
    """SIGHUP (the terminal closed) stops bench like SIGTERM: partial results (complete: false) are published as
    one set, with the exit code 128 + the signal's number."""
    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BENCH, str(tiny_onnx), str(out)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == code, err
    assert word in err and "partial results" in err and "Traceback" not in err
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is False and word.split(" ", 1)[1].strip("()") in data["interrupted"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder, no partial file
