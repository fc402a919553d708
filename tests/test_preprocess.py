"""The shared image pipeline: mmcls test transform, folder layouts, bad files."""
import logging

import numpy as np
import pytest
from PIL import Image

from sedeploy.errors import SedeployError
from sedeploy.preprocess import Preprocess, find_images, load_batch, load_folder, load_image


def _write(path, w, h, color=(200, 100, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)
    return path


def test_resize_crop_normalise_matches_mmcls_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", Preprocess())
    # reference: short side 300 → 256, long 400 → 341; centre crop 224; normalise
    ref = Image.fromarray(arr).resize((341, 256), Image.BILINEAR)
    left, top = round((341 - 224) / 2), round((256 - 224) / 2)
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), np.float32)
    ref = (ref - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref.transpose(2, 0, 1), atol=1e-5)


def test_for_size_scales_resize():
    assert Preprocess.for_size(224).resize_short == 256
    assert Preprocess.for_size(112).resize_short == 128


def test_flat_and_imagefolder_layouts(tmp_path):
    _write(tmp_path / "flat" / "b.jpg", 40, 30)
    _write(tmp_path / "flat" / "a.png", 30, 40)
    found = find_images(tmp_path / "flat")
    assert [p.name for p in found.paths] == ["a.png", "b.jpg"] and found.classes == [None, None]
    _write(tmp_path / "tree" / "n02" / "x.jpg", 40, 30)
    _write(tmp_path / "tree" / "n01" / "y.jpg", 40, 30)
    found = find_images(tmp_path / "tree")
    assert found.classes == ["n01", "n02"]


def test_corrupt_and_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    _write(tmp_path / "good.jpg", 64, 64)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        x, paths = load_folder(tmp_path, Preprocess.for_size(32))
    assert [p.name for p in paths] == ["good.jpg"] and x.shape == (1, 3, 32, 32)
    assert "broken.jpg" in caplog.text and "notes.bin" in caplog.text


def test_decompression_bomb_is_skipped_not_a_traceback(tmp_path, caplog, monkeypatch, recwarn):
    """An image whose pixel count passes PIL's safety limit (a small file that decodes to gigabytes) is skipped
    like a corrupt one; below twice the limit it loads without PIL's raw warning. The limit is lowered here so the
    test images stay small."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _write(tmp_path / "good.jpg", 30, 30)  # 900 pixels: under the limit
    _write(tmp_path / "large.jpg", 40, 40)  # 1,600: over the limit, under twice it: loads, PIL's warning silenced
    Image.new("1", (100, 100)).save(tmp_path / "bomb.png")  # 10,000: over twice the limit: PIL raises
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        x, paths = load_folder(tmp_path, Preprocess.for_size(16))
    assert sorted(p.name for p in paths) == ["good.jpg", "large.jpg"] and x.shape == (2, 3, 16, 16)
    assert "bomb.png (too large to decode safely" in caplog.text
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_an_unreadable_image_is_named_once_per_process(tmp_path, caplog):
    """build-engine reads its --calib folder up to three times (fusion check, FP16 check, calibration)."""
    _write(tmp_path / "good.jpg", 40, 40)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="sedeploy"):
        for _ in range(3):
            x, paths = load_folder(tmp_path, Preprocess.for_size(16))
            assert [p.name for p in paths] == ["good.jpg"]  # skipped every time
    assert caplog.text.count("broken.jpg") == 1


def test_folder_errors(tmp_path):
    with pytest.raises(SedeployError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SedeployError, match="contains no images"):
        find_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("nope")
    with pytest.raises(SedeployError, match="could be decoded"):
        load_folder(tmp_path / "bad")
    with pytest.raises(SedeployError, match="is a file"):
        find_images(tmp_path / "bad" / "x.jpg")


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.new("L", (50, 50), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (50, 50), (1, 2, 3, 4)).save(tmp_path / "r.png")
    x, _ = load_batch([tmp_path / "g.png", tmp_path / "r.png"], Preprocess.for_size(32))
    assert x.shape == (2, 3, 32, 32)
