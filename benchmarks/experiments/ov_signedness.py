"""Signed int8 activations in the OpenVINO INT8 form: speed against OpenVINO + NNCF INT8, interleaved, and agreement.

Builds, from one calibration, the ``int8-ov`` artifact with uint8 asymmetric activations (the earlier form) and with
``signed_activations`` (int8 symmetric where a tensor has negative values, uint8 with zero point 0 after ReLU —
NNCF's choice), compiles both with OpenVINO, and times them interleaved with OpenVINO FP32 and OpenVINO + NNCF INT8
(NNCF's default preset on the same calibration images) at batch 1 and 8. Agreement with FP32: the tiny trained
SE-ResNet-18 of the tests (500 held-out images) and SE-ResNet-50 (random weights) on real ImageNet-val images.

    python benchmarks/experiments/ov_signedness.py --images ../shared/data/imagenet-val-1300/images
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH))  # benchmarks/common.py
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))

FORMS = {"uint8 asymmetric": False, "signed (int8 symmetric / uint8 zp 0)": True}


def _quantize(fp32: Path, cal, out: Path, signed: bool, pp=None) -> dict[str, Path]:
    from sedeploy.backends import EngineOptions
    from sedeploy.backends.openvino import build_engine
    from sedeploy.quantize import CpuOptions, quantize_model

    engines = {}
    for name, flag in FORMS.items():
        if signed is not None and flag != signed:
            continue
        folder = out / ("signed" if flag else "unsigned")
        folder.mkdir(parents=True, exist_ok=True)
        art = folder / f"{fp32.name.removesuffix('.onnx').removesuffix('.fp32')}.int8-ov.onnx"
        quantize_model(fp32, cal, art, flavour="ov",
                       cpu_options=CpuOptions(format="qdq", reduce_range=False, signed_activations=flag))
        engines[name] = build_engine(art, folder, EngineOptions(threads=2)).path
    return engines


def _logits(runner, x, batch=50):
    return np.concatenate([runner.infer(x[i:i + batch]) for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--image-limit", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-ov-signedness")
    ap.add_argument("--tiny-cache", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-tiny-cache")
    args = ap.parse_args(argv)

    from sedeploy.backends import EngineOptions
    from sedeploy.backends.openvino import OpenVinoRunner, build_engine
    from sedeploy.bench.engines import describe_engine
    from sedeploy.bench.peers import make_peers
    from sedeploy.backends.timing import paired_speedup, time_runners
    from sedeploy.quantize import calibrate
    from sedeploy.export import export_onnx
    from sedeploy.model import build_model
    from sedeploy.passes import fuse_se_blocks
    from sedeploy.onnxcore import load_onnx, save_onnx
    from sedeploy.preprocess import Preprocess, find_images, load_batch
    from tiny_trained import tiny_trained

    from common import write_results

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    calib = BENCH.parent / "calib"
    res: dict = {"forms": list(FORMS), "calibration": f"percentile on the {calib.name}/ photos (27)"}

    # agreement on the tiny trained network
    art = tiny_trained(args.tiny_cache)
    tcal = calibrate(art.onnx_path, art.calib_dir, progress=False, cache_dir=work / "cache", preprocess=art.preprocess)
    tiny_engines = _quantize(Path(art.onnx_path), tcal, work / "tiny", None)
    fp32_tiny = build_engine(art.onnx_path, work / "tiny", EngineOptions(threads=2)).path
    with OpenVinoRunner(fp32_tiny, threads=2) as r:
        ref = _logits(r, art.images, 100)
    res["agreement_tiny_trained"] = {}
    for name, path in tiny_engines.items():
        with OpenVinoRunner(path, threads=2) as r:
            got = _logits(r, art.images, 100)
        res["agreement_tiny_trained"][name] = round(100 * float((got.argmax(1) == ref.argmax(1)).mean()), 2)

    # SE-ResNet-50: speed (interleaved with the peers) and agreement on real images
    raw = export_onnx(build_model(50, seed=0), work / "se-resnet50.onnx", input_size=224)
    fused, _ = fuse_se_blocks(load_onnx(raw))
    fp32 = save_onnx(fused, work / "se-resnet50.fp32.onnx")
    cal = calibrate(fp32, calib, progress=False, cache_dir=work / "cache")
    engines = _quantize(fp32, cal, work / "se50", None)
    fp32_engine = build_engine(fp32, work / "se50", EngineOptions(threads=2)).path
    found = find_images(args.images)
    x, _ = load_batch(found.paths[: args.image_limit], Preprocess())
    runners = {"OpenVINO FP32 (sedeploy)": OpenVinoRunner(fp32_engine, threads=2).activate()}
    runners.update({f"int8-ov, {n}": OpenVinoRunner(p, threads=2).activate() for n, p in engines.items()})
    peers = make_peers(describe_engine(fp32_engine), Preprocess(), threads=2, calib=calib)
    for peer in peers:
        runners[peer.spec.name] = peer.runner.activate()
    nncf = next(n for n in runners if "nncf" in n)
    ref = _logits(runners["OpenVINO FP32 (sedeploy)"], x)
    res["agreement_se50_random"] = {n: round(100 * float((_logits(r, x).argmax(1) == ref.argmax(1)).mean()), 2)
                                    for n, r in runners.items()}
    t = time_runners(runners, x[:8], batch_sizes=(1, 8), warmup=3, repeats=args.repeats, settle=1)
    res["speed_se50"] = {str(b): {n: {"img_s": round(b / float(np.median(t.samples[n][b])), 1),
                                      "x_nncf": round(paired_speedup(t.samples[nncf][b], t.samples[n][b]), 3)}
                                  for n in runners} for b in (1, 8)}
    res["timer"] = "one synchronous infer call, host numpy in → host numpy out; interleaved, settle 1"
    for r in runners.values():
        r.deactivate()

    lines = ["# Signed int8 activations in the OpenVINO INT8 form", "",
             "Interleaved with OpenVINO FP32 and OpenVINO + NNCF INT8 in one process (2 threads, SE-ResNet-50, random "
             f"weights, {args.repeats} rounds, settle 1). × NNCF: median of per-round ratios.", "",
             "| engine | b1 img/s | b1 × NNCF | b8 img/s | b8 × NNCF | agreement SE-50 (random, real images) |",
             "|---|---|---|---|---|---|"]
    for n in runners:
        s1, s8 = res["speed_se50"]["1"][n], res["speed_se50"]["8"][n]
        lines.append(f"| {n} | {s1['img_s']} | {s1['x_nncf']} | {s8['img_s']} | {s8['x_nncf']} | "
                     f"{res['agreement_se50_random'][n]} % |")
    lines += ["", "Top-1 agreement with FP32 on the tiny trained SE-ResNet-18 (500 held-out images): "
              + "; ".join(f"{n}: {v} %" for n, v in res["agreement_tiny_trained"].items())]
    print("\n".join(lines))
    write_results(__file__, res, "\n".join(lines), argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
