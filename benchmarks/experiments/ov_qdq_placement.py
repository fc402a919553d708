"""Where the OpenVINO INT8 artifact rounds: Q/DQ placement against accuracy and speed on the trained reference.

The ``int8-ov`` flavour quantizes, besides every Conv/Gemm input and weight, the ops of
:data:`sedeploy.quantize.OV_OPTIONS` ``extra_ops`` (residual Add, SE Mul/Sigmoid/squeeze, Relu, MaxPool, Reshape,
Flatten): every one is a Q/DQ pair on its inputs and output, so a tensor may be rounded more than once between
two convolutions. Each rounding costs agreement; whether it buys speed depends on what OpenVINO fuses. This
script builds one artifact per placement from one FP32 graph and one calibration, and measures

- top-1 agreement with FP32 (OpenVINO f32 on the same FP32 ONNX) on Imagenette val (3,925 images, never
  calibrated on), and top-1 against the labels;
- speed at batch 1 and 8 on OpenVINO, interleaved with OpenVINO FP32 and OpenVINO + NNCF INT8 (NNCF's default
  preset on the *same* calibration images) in one run (:func:`sedeploy.backends.timing.time_runners`: round-robin,
  rotated order, one settle call before each timed call; the timer covers one synchronous ``infer``, host numpy
  in → out; ratios are medians of per-round ratios).

What it showed (benchmarks/results/ov_qdq_placement/): with ``Relu`` among the quantized op types, ONNX Runtime's
QDQ quantizer folds every ReLU into the uint8 QuantizeLinear after it (0 Relu nodes left), so a residual Add output
is rounded once, on 255 levels over [0, t]; without it the Add output is rounded on the signed int8 grid *before*
the ReLU (7 bits for what the ReLU keeps) and again after — 1 pt of agreement. That fold is also where the
default's agreement lead over NNCF comes from.

The reference is the checkpoint ``benchmarks/train_reference.py`` writes (112 px). Artifacts and the export are
shared with ``benchmarks/reference_int8.py`` (same work folder).

    python benchmarks/train_reference.py        # once
    python benchmarks/experiments/ov_qdq_placement.py
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from reference_int8 import add_reference_args, pct, prepare, reference_missing, run_logits  # noqa: E402

#: placement name → extra op types quantized besides Conv/Gemm (None: the flavour's default, OV_OPTIONS)
PLACEMENTS = {
    "default (every op of OV_OPTIONS)": None,
    "conv only": (),
    "conv + residual Add": ("Add",),
    "conv + Add + pools": ("Add", "GlobalAveragePool", "MaxPool"),
    "conv + Add + SE (Mul, Sigmoid, squeeze)": ("Add", "Mul", "Sigmoid", "GlobalAveragePool"),
    "default without Relu": ("Add", "Mul", "Sigmoid", "GlobalAveragePool", "MaxPool", "Reshape", "Flatten"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reference_args(ap, repeats=20)
    ap.add_argument("--method", default="mse")
    ap.add_argument("--only", nargs="*", help="placement names to run (default: all)")
    ap.add_argument("--no-speed", action="store_true", help="agreement only")
    args = ap.parse_args(argv)
    if reference_missing(args):
        return 2
    import openvino as ov
    import nncf

    from common import time_activated, write_results
    from sedeploy.backends.openvino import OpenVinoModelRunner
    from sedeploy.backends.timing import paired_speedup
    from sedeploy.quantize import calibrate, select_images
    from sedeploy.quantize import OV_OPTIONS, quantize_model
    from sedeploy.preprocess import load_batch

    work = args.work
    fp32, pp, x, y = prepare(args.checkpoint, args.size, args.data, work)
    ref = run_logits(fp32, "ov", "fp32", x)
    cal = calibrate(fp32, args.data / "train", method=args.method, count=args.calib_count, preprocess=pp,
                    progress=False, cache_dir=work / "cache")
    res = {"model": f"trained reference SE-ResNet-50 ({args.checkpoint.name}), {args.size} px",
           "val_images": int(len(x)), "calibration": f"{args.calib_count} Imagenette train images, seed 0, "
                                                     f"{args.method} ranges",
           "fp32_top1_pct": pct(ref.argmax(1) == y), "rows": {}}
    arts = {}
    for name, extra in PLACEMENTS.items():
        if args.only and name not in args.only:
            continue
        opts = OV_OPTIONS if extra is None else dataclasses.replace(OV_OPTIONS, extra_ops=tuple(extra))
        art = work / "placement" / (name.split(" (")[0].replace(" ", "_").replace("+", "p") + ".onnx")
        art.parent.mkdir(exist_ok=True)
        qr = quantize_model(fp32, cal, art, flavour="ov", cpu_options=opts)
        got = run_logits(art, "ov", "int8", x)
        res["rows"][name] = {"extra_ops": list(opts.extra_ops), "qdq_nodes": qr.op_histogram.get("QuantizeLinear", 0),
                             "agreement_pct": pct(got.argmax(1) == ref.argmax(1)),
                             "top1_pct": pct(got.argmax(1) == y)}
        arts[name] = art
        print(name, res["rows"][name], flush=True)

    # NNCF on the very images sedeploy calibrated on
    _, paths = select_images(args.data / "train", args.calib_count, 0)
    cx, _ = load_batch(paths, pp)
    nncf_model = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset([cx[i:i + 1] for i in range(len(cx))]))
    with OpenVinoModelRunner(nncf_model, precision="int8", threads=2) as r:
        got = np.concatenate([r.infer(x[i:i + 64]) for i in range(0, len(x), 64)])
    res["nncf"] = {"agreement_pct": pct(got.argmax(1) == ref.argmax(1)), "top1_pct": pct(got.argmax(1) == y),
                   "about": f"nncf.quantize, NNCF {nncf.__version__} default preset, same {len(cx)} images"}
    print("nncf", res["nncf"], flush=True)

    if not args.no_speed:
        runners = {"OpenVINO FP32": OpenVinoModelRunner(fp32, precision="fp32", threads=2),
                   "OpenVINO + NNCF INT8": OpenVinoModelRunner(nncf_model, precision="int8", threads=2)}
        runners.update({n: OpenVinoModelRunner(a, precision="int8", threads=2) for n, a in arts.items()})
        t = time_activated(runners, x[:8], batch_sizes=(1, 8), warmup=3, repeats=args.repeats, settle=1)
        res["speed"] = {b: {n: {"median_ms": round(float(np.median(t.samples[n][b])) * 1e3, 3),
                                "x_fp32": round(paired_speedup(t.samples["OpenVINO FP32"][b], t.samples[n][b]), 3),
                                "x_nncf": round(paired_speedup(t.samples["OpenVINO + NNCF INT8"][b],
                                                               t.samples[n][b]), 3)}
                            for n in runners} for b in (1, 8)}
        res["timer"] = "one synchronous OpenVinoModelRunner.infer per sample, interleaved; medians of per-round ratios"

    lines = [f"# Q/DQ placement of the OpenVINO INT8 artifact on the {res['model']}", "",
             f"Agreement: top-1 agreement with OpenVINO FP32 on Imagenette val ({res['val_images']} images); "
             f"calibration: {res['calibration']} (NNCF on the same images). FP32 top-1 {res['fp32_top1_pct']} %.",
             "", "| placement | QuantizeLinear nodes | agreement | top-1 | × FP32 b1 | × NNCF b1 | × FP32 b8 | × NNCF b8 |",
             "|---|---|---|---|---|---|---|---|"]
    sp = res.get("speed", {})

    def speed_cells(n):
        if not sp:
            return "– | – | – | –"
        return " | ".join(f"{sp[b][n]['x_fp32']} | {sp[b][n]['x_nncf']}" for b in (1, 8))

    for n, r in res["rows"].items():
        lines.append(f"| {n} | {r['qdq_nodes']} | {r['agreement_pct']} % | {r['top1_pct']} % | {speed_cells(n)} |")
    lines.append(f"| OpenVINO + NNCF INT8 (peer) | – | {res['nncf']['agreement_pct']} % | {res['nncf']['top1_pct']} % | "
                 f"{speed_cells('OpenVINO + NNCF INT8')} |")
    if sp:
        lines += ["", f"Timer: {res['timer']}; {args.repeats} rounds per batch size."]
    print("\n".join(lines))
    # the reference's own size writes results.*; other sizes (the model was trained at 112 px) beside it
    write_results(__file__, res, "\n".join(lines), argv=argv if argv is not None else sys.argv[1:],
                  name="results" if args.size == 112 else f"results-{args.size}px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
