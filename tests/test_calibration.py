"""Calibration: sane ranges per method, a cache key that follows every input, clear errors on bad folders."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sedeploy.quantize import CalibrationResult, calibrate, calibration_key, method_params
from sedeploy.errors import SedeployError
from sedeploy.preprocess import Preprocess



@pytest.fixture(scope="session")
def tiny(tiny_trained_art):
    return tiny_trained_art


@pytest.fixture()
def calib16(tiny, tmp_path) -> Path:
    """A private copy of 16 calibration PNGs (tests modify it)."""
    folder = tmp_path / "calib"
    folder.mkdir()
    for p in sorted(tiny.calib_dir.iterdir())[:16]:
        shutil.copy(p, folder / p.name)
    return folder


def _cal(tiny, folder, tmp_path, **kw):
    kw.setdefault("method", "minmax")
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("preprocess", tiny.preprocess)
    return calibrate(tiny.onnx_path, folder, progress=False, **kw)


@pytest.mark.slow
def test_methods_give_sane_ranges(tiny, tmp_path):
    res = {m: _cal(tiny, tiny.calib_dir, tmp_path, method=m, count=32) for m in ("minmax", "entropy", "percentile")}
    mm = res["minmax"]
    assert set(res["entropy"].ranges) == set(mm.ranges) and len(mm.ranges) > 50
    inp = mm.ranges["input"]  # normalised pixels: (0 - 123.675)/58.395 … (255 - 103.53)/57.375
    assert -2.2 < inp[0] < -1.0 and 1.0 < inp[1] < 2.7
    for name, (lo, hi) in mm.ranges.items():
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi, name
    clipped = 0
    for m in ("entropy", "percentile"):
        for name in mm.ranges:
            assert res[m].amax(name) <= mm.amax(name) * (1 + 1e-6), (m, name)
            clipped += res[m].amax(name) < 0.999 * mm.amax(name)
    assert clipped > 20  # the histogram methods actually clip outliers on many tensors
    relu_outputs = [n for n in mm.ranges if n.startswith("relu")]
    assert relu_outputs and all(mm.ranges[n][0] == 0.0 for n in relu_outputs)
    assert mm.method == "minmax" and len(mm.images) == 32 and not mm.cache_hit


def test_cache_hit_and_key_changes_with_every_input(tiny, calib16, tmp_path):
    first = _cal(tiny, calib16, tmp_path)
    again = _cal(tiny, calib16, tmp_path)
    assert again.cache_hit and again.key == first.key and again.ranges == first.ranges
    assert Path(again.cache_path).is_file()

    base = dict(model_sha256="a" * 64, images=[("x.png", "1" * 64), ("y.png", "2" * 64)], preprocess=Preprocess(),
                method="entropy", params=method_params("entropy"), count=256, seed=0)
    k0 = calibration_key(**base)
    variants = [dict(model_sha256="b" * 64), dict(images=[("x.png", "1" * 64)]),
                dict(images=[("x.png", "1" * 64), ("z.png", "2" * 64)]),
                dict(images=[("x.png", "1" * 64), ("y.png", "3" * 64)]), dict(preprocess=Preprocess.for_size(32)),
                dict(method="percentile", params=method_params("percentile")),
                dict(params=method_params("percentile", 99.9) | {"bins": 2048}), dict(count=128), dict(seed=1)]
    keys = {calibration_key(**{**base, **v}) for v in variants}
    assert k0 not in keys and len(keys) == len(variants)

    # the same changes through calibrate(): image contents, image list, method, seed/count, preprocessing, model
    Path(calib16 / sorted(os.listdir(calib16))[0]).write_bytes((tiny.calib_dir / "calib_040.png").read_bytes())
    changed = _cal(tiny, calib16, tmp_path)
    assert not changed.cache_hit and changed.key != first.key
    (calib16 / "calib_000.png").unlink(missing_ok=True)
    shutil.copy(tiny.calib_dir / "calib_050.png", calib16 / "extra.png")
    listed = _cal(tiny, calib16, tmp_path)
    assert not listed.cache_hit and listed.key not in (first.key, changed.key)
    others = [_cal(tiny, calib16, tmp_path, method="percentile"), _cal(tiny, calib16, tmp_path, seed=5),
              _cal(tiny, calib16, tmp_path, count=15),
              _cal(tiny, calib16, tmp_path, preprocess=replace(tiny.preprocess, resize_short=40))]
    assert _cal(tiny, calib16, tmp_path).cache_hit  # unchanged inputs hit again
    keys = {listed.key, *(o.key for o in others)}
    assert len(keys) == 5 and not any(o.cache_hit for o in others)


def test_model_bytes_change_key(tiny, calib16, tmp_path):
    import onnx

    a = _cal(tiny, calib16, tmp_path)
    m = onnx.load(str(tiny.onnx_path))
    m.metadata_props.add(key="touched", value="1")
    other = tmp_path / "other.onnx"
    onnx.save(m, str(other))
    b = calibrate(other, calib16, method="minmax", cache_dir=tmp_path / "cache", progress=False,
                  preprocess=tiny.preprocess)
    assert b.key != a.key and not b.cache_hit and b.ranges.keys() == a.ranges.keys()


def test_stale_pinned_cache_is_recomputed(tiny, calib16, tmp_path, caplog):
    pinned = tmp_path / "pinned.json"
    a = _cal(tiny, calib16, tmp_path, cache_path=pinned)
    assert pinned.is_file() and not a.cache_hit
    assert _cal(tiny, calib16, tmp_path, cache_path=pinned).cache_hit
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        b = _cal(tiny, calib16, tmp_path, cache_path=pinned, method="percentile")
    assert not b.cache_hit and b.key != a.key and "different inputs" in caplog.text
    assert CalibrationResult.load(pinned).key == b.key  # overwritten with the fresh result


def test_pinned_cache_that_is_no_calibration_file_is_never_overwritten(tiny, calib16, tmp_path):
    """--calib-cache naming an existing file that is not a calibration file (the model itself, an image, a README)
    is refused: overwriting it would destroy the user's file."""
    for content in (tiny.onnx_path.read_bytes(), b"# notes\n", b"[]"):
        pinned = tmp_path / "precious.file"
        pinned.write_bytes(content)
        with pytest.raises(SedeployError, match=r"exists and is not a sedeploy calibration file.*not overwritten"):
            _cal(tiny, calib16, tmp_path, cache_path=pinned)
        assert pinned.read_bytes() == content


def test_damaged_default_cache_entries_are_recomputed_or_named(tiny, calib16, tmp_path, caplog):
    a = _cal(tiny, calib16, tmp_path)
    entry = Path(a.cache_path)
    entry.write_text("[]")  # valid JSON, not an object: sedeploy's own cache entry, so recomputed
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        b = _cal(tiny, calib16, tmp_path)
    assert not b.cache_hit and "Ignoring unreadable calibration cache" in caplog.text
    assert CalibrationResult.load(entry).key == a.key
    import json

    for damage in ({"ranges": {k: [float("nan"), 1.0] for k in a.ranges}}, {"version": 99}, {"method": "bogus"},
                   {"ranges": {k: [5.0, -5.0] for k in a.ranges}}, {"ranges": {k: [0.0, 0.0] for k in a.ranges}},
                   {"content_sha256": None}):
        entry.write_text(json.dumps({**a.to_dict(), **damage}))  # the key still matches: the contents are checked
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sedeploy"):
            c = _cal(tiny, calib16, tmp_path)
        assert not c.cache_hit and "Ignoring unreadable calibration cache" in caplog.text, damage
    entry.unlink()
    entry.mkdir()  # a folder where the entry goes: one clear error, not an IsADirectoryError traceback
    with pytest.raises(SedeployError, match="is a folder"):
        _cal(tiny, calib16, tmp_path)


def test_too_few_images_names_the_count(tiny, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(tiny.calib_dir.iterdir())[:5]:
        shutil.copy(p, folder / p.name)
    with pytest.raises(SedeployError, match=r"at least 16 images; 5 found"):
        _cal(tiny, folder, tmp_path, method="entropy")
    with pytest.raises(SedeployError, match=r"at least 16 images; 8 requested"):
        _cal(tiny, tiny.calib_dir, tmp_path, method="percentile", count=8)
    assert len(_cal(tiny, folder, tmp_path, method="minmax").images) == 5  # min/max accepts any sample


def test_empty_missing_and_corrupt_folders(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SedeployError, match="contains no images"):
        _cal(tiny, empty, tmp_path)
    with pytest.raises(SedeployError, match="does not exist"):
        _cal(tiny, tmp_path / "nope", tmp_path)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"bad{i}.jpg").write_bytes(b"not a jpeg" * i)
    with pytest.raises(SedeployError, match="could be decoded"):
        _cal(tiny, corrupt, tmp_path)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.json"))
    with pytest.raises(SedeployError, match="Unknown calibration method"):
        _cal(tiny, tiny.calib_dir, tmp_path, method="kl")


def test_entropy_keeps_relu_ranges(tiny, tmp_path):
    mm = _cal(tiny, tiny.calib_dir, tmp_path, method="minmax", count=32)
    en = _cal(tiny, tiny.calib_dir, tmp_path, method="entropy", count=32)
    relus = [n for n in mm.ranges if n.startswith("relu")]
    ratios = [en.amax(n) / mm.amax(n) for n in relus if mm.amax(n) > 0]
    # measured: int8 top-1 agreement 99.2 % (trt) with ranges at ~this ratio, 25.6 % with the collapsed ones
    assert float(np.median(ratios)) > 0.5, f"median entropy/minmax amax on ReLU outputs {np.median(ratios):.2f}"


def test_mse_threshold_follows_the_grid():
    """mse picks the clipping threshold for the grid a tensor is rounded to: 255 uint8 levels over [0, t] have half
    the step of 127 int8 levels, so the optimum clips less — never more — on a heavy-tailed histogram."""
    from sedeploy.quantize import HIST_BINS, mse_amax

    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_t(3, size=200_000))  # post-ReLU-like, heavy tail
    top = 2.0 ** np.ceil(np.log2(x.max()))
    hist = np.bincount(np.minimum((x / top * HIST_BINS).astype(int), HIST_BINS - 1), minlength=HIST_BINS)
    t127, t255 = mse_amax(hist, top, 127), mse_amax(hist, top, 255)
    assert 0 < t127 < t255 <= x.max() + top / HIST_BINS


def test_uint8_ranges_for_non_negative_tensors(tiny, tmp_path):
    cal = _cal(tiny, tiny.calib_dir, tmp_path, method="mse", count=16)
    assert cal.uint8_ranges and set(cal.uint8_ranges) < set(cal.ranges)
    for name, (lo, hi) in cal.uint8_ranges.items():
        assert lo >= 0 and cal.ranges[name][0] == lo, name
        assert hi >= cal.ranges[name][1] - 1e-9, name  # the uint8 grid never clips more than the int8 one
    assert sum(hi > cal.ranges[n][1] for n, (_, hi) in cal.uint8_ranges.items()) > 5  # and usually clips less
    assert cal.ranges_for("int8") == cal.ranges
    u8 = cal.ranges_for("uint8")
    assert set(u8) == set(cal.ranges) and all(u8[n] == r for n, r in cal.uint8_ranges.items())
    with pytest.raises(SedeployError, match="grid"):
        cal.ranges_for("int4")
    again = CalibrationResult.load(cal.cache_path)  # the cache keeps them
    assert again.uint8_ranges == cal.uint8_ranges
    assert not _cal(tiny, tiny.calib_dir, tmp_path, method="percentile", count=16).uint8_ranges


def test_too_few_images_fix_fits_the_case(tiny, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(tiny.calib_dir.iterdir())[:5]:
        shutil.copy(p, folder / p.name)
    with pytest.raises(SedeployError) as err:  # the folder holds 5: raising --calib-count cannot help
        _cal(tiny, folder, tmp_path, method="entropy")
    assert "add images to the folder" in err.value.fix and "--calib-count" not in err.value.fix
    with pytest.raises(SedeployError) as err:  # 8 requested from a larger folder: raising it helps
        _cal(tiny, tiny.calib_dir, tmp_path, method="percentile", count=8)
    assert "raise --calib-count to ≥ 16" in err.value.fix
