"""Checkpoint import: each layout loads to the exact same logits; each bad input gets its own clear error."""
from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile

import numpy as np
import pytest
import torch

from sedeploy import checkpoints as C
from sedeploy.errors import SedeployError
from sedeploy.model import build_model
from sedeploy.preprocess import smooth_noise

X = torch.from_numpy(smooth_noise(4, 64, seed=1))


def logits(model):
    with torch.no_grad():
        return model(X)


@pytest.fixture(scope="module")
def se18():
    return build_model(18, base_channels=8, num_classes=10, seed=3)


@pytest.fixture(scope="module")
def se50():
    return build_model(50, base_channels=8, num_classes=7, seed=5)


@pytest.fixture(scope="module")
def caffe50():
    return build_model(50, base_channels=8, num_classes=7, style="caffe", stem_pool_ceil=True, seed=5)


def save(obj, path):
    torch.save(obj, path)
    return path


def err_of(path, **kw) -> str:
    with pytest.raises(SedeployError) as info:
        C.load_checkpoint(str(path), **kw)
    return str(info.value)


# Key names as the published files spell them (mmcls / mmpretrain releases, timm, Cadene), not derived from our rename table.
LAYOUT = {
    "mmcls": ["backbone.conv1.weight", "backbone.layer1.0.se_layer.conv1.conv.weight",
              "backbone.layer4.2.se_layer.conv2.conv.bias", "backbone.layer2.0.downsample.1.running_var",
              "head.fc.weight"],
    "mmcls-20200708": ["backbone.conv1.weight", "backbone.layer1.0.se_layer.conv1.weight",
                       "backbone.layer4.2.se_layer.conv2.bias", "head.fc.bias"],
    "timm": ["conv1.weight", "bn1.running_mean", "layer1.0.se.fc1.weight", "layer4.2.se.fc2.bias",
             "layer2.0.downsample.0.weight", "fc.weight"],
    "cadene": ["layer0.conv1.weight", "layer0.bn1.running_mean", "layer1.0.se_module.fc1.weight",
               "layer4.2.se_module.fc2.bias", "layer2.0.downsample.0.weight", "last_linear.weight"],
}


@pytest.mark.parametrize("fmt,wrap", [("mmcls", "meta"), ("mmcls", "module"), ("mmcls-20200708", "bare"),
                                      ("timm", "bare"), ("timm", "model"), ("cadene", "bare")])
def test_every_format_loads_to_identical_logits(fmt, wrap, se50, caffe50, tmp_path):
    ref = caffe50 if fmt == "cadene" else se50
    sd = C.to_format(ref, fmt)
    assert set(LAYOUT[fmt]) <= set(sd)
    assert not any(k.startswith("backbone.") for k in sd) or fmt.startswith("mmcls")
    obj = {"meta": {"CLASSES": [str(i) for i in range(7)], "epoch": 100}, "state_dict": sd} if wrap == "meta" \
        else {"model": sd, "epoch": 3} if wrap == "model" \
        else {f"module.{k}": v for k, v in sd.items()} if wrap == "module" else sd
    path = save(obj, tmp_path / "ck.pth")
    loaded = C.load_checkpoint(str(path))
    assert loaded.format == fmt and loaded.spec == ref.spec and not loaded.model.training
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(logits(loaded.model), logits(ref))
    # The comparison can fail: other weights give other logits, and the logits differ between images.
    other = build_model(50, base_channels=8, num_classes=7, style=ref.spec.style,
                        stem_pool_ceil=ref.spec.stem_pool_ceil, seed=6)
    assert not torch.allclose(logits(other), logits(ref), atol=1e-2)
    assert len(set(logits(ref).argmax(1).tolist())) > 1


def test_cadene_is_the_caffe_network_and_differs_from_the_mmcls_one(caffe50, tmp_path):
    loaded = C.load_checkpoint(save(C.to_format(caffe50, "cadene"), tmp_path / "se_resnet50.pth"))
    assert (loaded.spec.style, loaded.spec.stem_pool_ceil) == ("caffe", True)
    pytorch_style = build_model(50, base_channels=8, num_classes=7, seed=None)
    pytorch_style.load_state_dict(caffe50.state_dict())  # same tensors, same keys: loads without complaint
    diff = (logits(pytorch_style) - logits(loaded.model)).abs().max().item()
    assert diff > 0.1, "the stride/pool differences must change the outputs, or modelling them would be pointless"


def test_to_format_refuses_a_layout_of_the_other_network(se50, caffe50):
    with pytest.raises(SedeployError, match="cannot be saved in the cadene layout"):
        C.to_format(se50, "cadene")
    with pytest.raises(SedeployError, match="cannot be saved in the timm layout"):
        C.to_format(caffe50, "timm")
    with pytest.raises(SedeployError, match="Unknown checkpoint format"):
        C.to_format(se50, "onnx")


def test_mmcls_tensor_counts_match_the_releases():
    # The published mmcls files hold 384 (-50) and 758 (-101) tensors, num_batches_tracked included.
    for depth, count in ((50, 384), (101, 758)):
        assert len(C.to_format(build_model(depth, base_channels=8, seed=None), "mmcls")) == count


@pytest.mark.parametrize("depth,se,fmt", [(18, True, "timm"), (34, True, "mmcls"), (50, False, "timm"),
                                          (101, True, "mmcls-20200708"), (152, False, "mmcls")])
def test_depth_se_width_and_classes_are_read_from_the_tensors(depth, se, fmt, tmp_path):
    net = build_model(depth, se=se, base_channels=8, num_classes=5, seed=None)
    loaded = C.load_checkpoint(save(C.to_format(net, fmt), tmp_path / "ck.pth"))
    assert loaded.spec == net.spec  # 34 and 50 have the same blocks per stage: the block type tells them apart


def test_missing_num_batches_tracked_is_tolerated(se18, tmp_path):
    sd = {k: v for k, v in C.to_format(se18, "timm").items() if not k.endswith("num_batches_tracked")}
    assert torch.equal(logits(C.load_checkpoint(save(sd, tmp_path / "ck.pth")).model), logits(se18))


def test_depth_and_num_classes_mismatch(se18, tmp_path):
    path = save(C.to_format(se18, "mmcls"), tmp_path / "ck.pth")
    msg = err_of(path, depth=50)
    assert "SE-ResNet-18, you asked for --depth 50" in msg and "--depth 18" in msg
    msg = err_of(path, num_classes=1000)
    assert "10-class head" in msg and "--num-classes 1000" in msg and "--num-classes 10" in msg
    assert C.load_checkpoint(path, depth=18, num_classes=10).spec.num_classes == 10


def test_strict_load_names_missing_unexpected_and_misshapen_keys(se18, tmp_path):
    sd = C.to_format(se18, "timm")
    gone = [k for k in sd if k.startswith("layer3.0.bn") and not k.endswith("num_batches_tracked")]
    assert len(gone) == 8
    broken = {k: v for k, v in sd.items() if k not in gone}
    broken["layer1.0.extra.weight"] = torch.zeros(3)
    broken["layer2.1.se.fc1.weight"] = torch.zeros(5, 5, 1, 1)
    msg = err_of(save(broken, tmp_path / "ck.pth"))
    assert "timm format" in msg and "se-resnet18" in msg
    assert "8 missing: layer3.0.bn1.weight" in msg and ", …" in msg  # first few, then the count says the rest
    assert "1 unexpected: layer1.0.extra.weight" in msg
    assert "1 with the wrong shape" in msg and "layer2.1.se.fc1.weight (5, 5, 1, 1) vs (8, 16, 1, 1)" in msg


def test_backbone_only_and_unsupported_depth(se18, tmp_path):
    sd = C.to_format(se18, "mmcls")
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert "no classifier head (head.fc.weight)" in err_of(save(headless, tmp_path / "a.pth"))
    short = {k: v for k, v in sd.items() if not k.startswith("backbone.layer3.1.")}
    assert "basic blocks (2, 2, 1, 2) per stage: no supported depth" in err_of(save(short, tmp_path / "b.pth"))


@pytest.mark.parametrize("case", ["vit", "moskomule", "not-tensors", "tensor"])
def test_other_architectures_and_layouts_are_refused(case, tmp_path):
    t = torch.zeros(2)
    obj = {"vit": {"backbone.cls_token": t, "backbone.patch_embed.projection.weight": t, "head.layers.head.weight": t},
           "moskomule": {"conv1.weight": t, "layer1.0.conv1.weight": t, "layer1.0.se.fc.0.weight": t, "fc.weight": t},
           "not-tensors": {"epoch": 3, "lr": 0.1},
           "tensor": torch.zeros(3, 3)}[case]
    msg = err_of(save(obj, tmp_path / "ck.pth"))
    assert "timm seresnet" in msg and "Cadene" in msg  # names what is supported
    assert {"vit": "another architecture", "moskomule": "senet.pytorch (moskomule)",
            "not-tensors": "entry 'epoch' is not a tensor (int)", "tensor": "holds a Tensor"}[case] in msg


def test_bad_files(se18, tmp_path):
    assert "does not exist" in err_of(tmp_path / "nope.pth")
    assert "is a folder" in err_of(tmp_path)
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    assert "not a PyTorch checkpoint" in err_of(tmp_path / "notes.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty (0 bytes)" in err_of(tmp_path / "empty.pth")
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as z:
        z.writestr("docs/readme.txt", "hello")
    assert "zip archive but not a PyTorch checkpoint" in err_of(tmp_path / "other.pth")
    sd = C.to_format(se18, "mmcls")
    for name, zip_format in (("new.pth", True), ("legacy.pth", False)):
        torch.save(sd, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        assert "truncated or corrupt" in err_of(tmp_path / name)


def test_pickled_objects_need_an_explicit_opt_in(se18, tmp_path):
    path = save({"meta": {"stats": np.zeros(2)}, "state_dict": C.to_format(se18, "mmcls")}, tmp_path / "ck.pth")
    msg = err_of(path)
    assert "pickled Python objects" in msg and "numpy" in msg and "allow_pickle=True" in msg
    assert torch.equal(logits(C.load_checkpoint(path, allow_pickle=True).model), logits(se18))


def test_weights_label(se18, tmp_path):
    assert C.weights_label(None, seed=3) == "random (seed 3)"
    path = save(C.to_format(se18, "timm"), tmp_path / "seresnet18.pth")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert C.weights_label(C.load_checkpoint(path)) == f"timm checkpoint seresnet18.pth (sha256 {sha[:12]})"


# ------------------------------------------------------------------------------------------------------------------
# URLs: a local HTTP server only; tests never reach the internet.


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_unreachable_url_says_offline_and_how_to_fix(no_proxy, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/se-resnet50.pth"
    msg = err_of(url, cache_dir=tmp_path / "cache")
    assert "offline or the URL is unreachable" in msg and url in msg
    assert "--checkpoint ./se-resnet50.pth" in msg and str(tmp_path / "cache" / "se-resnet50.pth") in msg
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-downloaded left behind


@pytest.fixture
def http_root(tmp_path, no_proxy):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_download_checks_the_hash_in_the_name_and_caches(se18, http_root, tmp_path):
    root, base = http_root
    data_path = save(C.to_format(se18, "mmcls"), root / "tmp.pth")
    sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
    good, bad = f"se18_20200804-{sha[:8]}.pth", f"se18_20200804-{'0' if sha[0] != '0' else '1'}{sha[1:8]}.pth"
    data_path.rename(root / good)
    (root / bad).write_bytes((root / good).read_bytes())
    cache = tmp_path / "cache"

    loaded = C.load_checkpoint(f"{base}/{good}", cache_dir=cache)
    assert loaded.source == f"{base}/{good}" and loaded.path == cache / good and loaded.sha256 == sha
    assert torch.equal(logits(loaded.model), logits(se18))
    msg = err_of(f"{base}/{bad}", cache_dir=cache)
    assert "name promises a hash starting" in msg and not (cache / bad).exists()
    assert sorted(p.name for p in cache.iterdir()) == [good]  # no partial files left behind

    (root / good).unlink()  # served from the cache now
    assert C.load_checkpoint(f"{base}/{good}", cache_dir=cache).sha256 == sha
    assert "404" in err_of(f"{base}/missing.pth", cache_dir=cache)


def test_default_cache_dir_follows_sedeploy_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SEDEPLOY_CACHE", str(tmp_path))
    assert C.default_cache_dir() == tmp_path / "checkpoints"
