"""Every third-party classifier in ../shared/data/models builds with the defaults (its own preprocessing options and
nothing else), and none of its INT8 engines is silently broken. One slow test per model; they skip with the reason
without ../shared. What holds on any CPU is asserted (exit code, SE blocks found in the file, finite figures, a
floor far below every measured agreement), not the exact agreement of a run (benchmarks/zoo.py measures that)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from sedeploy.cli import cli

#: each model's preprocessing as ../shared/data/models/README.md gives it, in build-engine's options
ZOO = {
    "efficientnet_lite0_torch_legacy": (["--mean", "127,127,127", "--std", "128,128,128", "--resize", "256"], 0),
    "mobilenet_v1_0.25_224_tf2onnx": (["--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5", "--resize",
                                       "256", "--label-offset", "1"], 0),
    "mobilenet_v1_0.25_224_tf2onnx_nchw": (["--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5", "--resize",
                                            "256", "--label-offset", "1"], 0),
    "squeezenet1.1_gluon_webnn": (["--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375", "--resize",
                                   "256"], 0),
    "ppocr_textdir_cls_paddle2onnx_op13": (["--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5",
                                            "--input-shape", "48x192", "--channel-order", "bgr", "--resize-mode",
                                            "pad"], 9),
}
#: INT8 top-1 agreement with FP32 that every deployed form clears by a wide margin on every CPU measured
#: (benchmarks/results/zoo_int8: 84–98 % on 1,236 images); a broken form agrees on a few percent
INT8_FLOOR_PCT = 60.0


@pytest.fixture(scope="module")
def images(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """32 calibration and 32 held-out images (links into imagenet-val-1300)."""
    src = sorted((shared_data / "imagenet-val-1300" / "images").iterdir())
    root = tmp_path_factory.mktemp("zoo")
    folders = []
    for name, chosen in (("calib", src[:32]), ("val", src[32:64])):
        d = root / name
        d.mkdir()
        for p in chosen:
            (d / p.name).symlink_to(p)
        folders.append(d)
    return folders[0], folders[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_builds_with_the_defaults(name, shared_data, images, tmp_path, monkeypatch):
    model = shared_data / "models" / f"{name}.onnx"
    if not model.is_file():
        pytest.skip(f"{model} is absent")
    monkeypatch.setenv("SEDEPLOY_CACHE", str(tmp_path / "cache"))
    flags, se_blocks = ZOO[name]
    calib, val = images
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build-engine", str(model), "--fp16", "--int8", "--calib", str(calib), "--val",
                                 str(val), *flags, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert (res["se_blocks_found"], res["se_blocks_fused"]) == (se_blocks, se_blocks)
    assert {a["kind"] for a in res["artifacts"]} >= {"fp32", "fp16", "int8-trt", "int8-cpu"}
    assert res["engines"] and (out / "manifest.json").is_file()
    check = res["int8_check"]
    assert check["measured"], check
    for kind, m in check["artifacts"].items():
        assert m["n"] == 32 and math.isfinite(m["agreement_pct"]), (kind, m)
        assert m["agreement_pct"] >= INT8_FLOOR_PCT, f"{name} {kind}: {m['agreement_pct']} % agreement with FP32"
