"""OpenVINO with the batch compiled static vs dynamic, for sedeploy's engines and the NNCF peer alike, interleaved.

sedeploy's OpenVINO runner compiles a dynamic-batch model once more for each batch size it is fed
(:class:`sedeploy.backends.openvino.OpenVinoModelRunner`, ``static_batch``). This measures what that buys, and —
since a user of NNCF could do the same — what it buys the peer: SE-ResNet-(``--depth``), random weights (speed
does not depend on them), the ``int8-ov`` artifact calibrated on the shipped ``calib/`` photos, the FP32 engine,
and OpenVINO + NNCF INT8 (NNCF's default preset on the same photos), each run with ``static_batch`` on and off,
all timed interleaved in one process (:func:`sedeploy.backends.timing.time_runners`, settle 1, 2 threads). The timer
covers one synchronous ``infer`` (host numpy in → out). Ratios: medians of per-round ratios against the NNCF peer
as NNCF's documentation runs it (dynamic batch, as read).

    python benchmarks/experiments/ov_static_batch.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-ov-static")
    args = ap.parse_args(argv)

    from common import write_results
    from sedeploy.backends import EngineOptions
    from sedeploy.backends.openvino import OpenVinoModelRunner, OpenVinoRunner, build_engine
    from sedeploy.bench.engines import describe_engine
    from sedeploy.bench.peers import PEER_NNCF, make_peers
    from sedeploy.backends.timing import paired_speedup, time_runners
    from sedeploy.quantize import calibrate
    from sedeploy.export import export_onnx
    from sedeploy.quantize import quantize_model
    from sedeploy.model import build_model
    from sedeploy.onnxcore import load_onnx, save_onnx
    from sedeploy.passes import fuse_se_blocks
    from sedeploy.preprocess import Preprocess, find_images, load_batch

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    calib = BENCH.parent / "calib"
    stem = f"se-resnet{args.depth}"
    fp32 = work / f"{stem}.fp32.onnx"
    if not fp32.is_file():
        raw = export_onnx(build_model(args.depth, seed=0), work / f"{stem}.onnx", input_size=224)
        save_onnx(fuse_se_blocks(load_onnx(raw))[0], fp32)
    art = work / f"{stem}.int8-ov.onnx"
    quantize_model(fp32, calibrate(fp32, calib, progress=False), art, flavour="ov")
    engines = {"fp32": build_engine(fp32, work, EngineOptions(threads=2)).path,
               "int8-ov": build_engine(art, work, EngineOptions(threads=2)).path}
    peer = next(p for p in make_peers(describe_engine(engines["fp32"]), Preprocess(), threads=2, calib=calib)
                if p.spec.name == PEER_NNCF)
    runners = {}
    for static in (False, True):
        tag = "static" if static else "dynamic"
        for kind, path in engines.items():
            runners[f"sedeploy {kind}, {tag}"] = OpenVinoRunner(path, threads=2, static_batch=static)
        runners[f"NNCF INT8, {tag}"] = OpenVinoModelRunner(peer.runner.source, precision="int8", threads=2,
                                                          static_batch=static)
    x, _ = load_batch(find_images(calib).paths, Preprocess())
    for r in runners.values():
        r.activate()
    t = time_runners(runners, x[:8], batch_sizes=(1, 8), warmup=3, repeats=args.repeats, settle=1)
    for r in runners.values():
        r.deactivate()
    base = "NNCF INT8, dynamic"
    res = {"depth": args.depth, "timer": "one synchronous infer call, host numpy in → out; interleaved, settle 1",
           "rows": {n: {str(b): {"img_s": round(b / float(np.median(t.samples[n][b])), 1),
                                 "iqr_pct": t.stats(n, b)["spread"]["iqr_pct"],
                                 "x_nncf_dynamic": round(paired_speedup(t.samples[base][b], t.samples[n][b]), 3),
                                 "x_nncf_static": round(paired_speedup(t.samples["NNCF INT8, static"][b],
                                                                       t.samples[n][b]), 3)}
                        for b in (1, 8)} for n in runners}}
    lines = [f"# OpenVINO: static vs dynamic batch — SE-ResNet-{args.depth}, 2 threads", "",
             f"Interleaved in one process ({args.repeats} rounds, settle 1). Timer: {res['timer']}. Ratios: medians of "
             "per-round ratios.", "",
             "| runner | b1 img/s | b1 × NNCF dynamic | b1 × NNCF static | b8 img/s | b8 × NNCF dynamic | "
             "b8 × NNCF static |", "|---|---|---|---|---|---|---|"]
    for n, r in res["rows"].items():
        lines.append(f"| {n} | {r['1']['img_s']} | {r['1']['x_nncf_dynamic']} | {r['1']['x_nncf_static']} | "
                     f"{r['8']['img_s']} | {r['8']['x_nncf_dynamic']} | {r['8']['x_nncf_static']} |")
    print("\n".join(lines))
    write_results(__file__, res, "\n".join(lines), argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
