"""Squeeze-first SE form on the CPU engines: what pooling before the expanding conv buys, side by side.

:func:`sedeploy.passes.squeeze_first` pools each bottleneck SE squeeze before the expanding 1×1 conv and folds that
conv into the first SE FC (exact: a 1×1 conv commutes with the spatial mean). This script times, interleaved in
one process (:func:`sedeploy.backends.timing.time_runners`: round-robin, rotated order, one settle call before each
timed call; the timer covers one synchronous ``infer``, host numpy in → out; ratios are medians of per-round
ratios):

- OpenVINO FP32 reading the standard-form ``.fp32.onnx`` (what ``bench --peers`` calls ``peer:openvino-fp32``)
  against sedeploy's OpenVINO FP32 engine (``build_engine``, which applies the rewrite);
- ONNX Runtime FP32 on the standard form and on the rewritten graph;
- INT8 on OpenVINO: NNCF (default preset, same calibration images), sedeploy's ``int8-ov`` artifact of the standard
  form, and an ``int8-ov`` artifact quantized from the rewritten graph (its own calibration).

Models: the trained reference SE-ResNet-50 (``benchmarks/train_reference.py``, 112 px; top-1 agreement of the INT8
forms with FP32 on the 3,925 Imagenette val images) and, for speed only, SE-ResNet-50 and -101 with random weights
at 224 px (calibrated on the shipped ``calib/`` photos).

    python benchmarks/experiments/squeeze_first.py [--skip-reference] [--depths 50 101]
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

from reference_int8 import add_reference_args, pct, prepare, reference_missing, run_logits  # noqa: E402

PEER_FP32, ENGINE_FP32 = "OpenVINO FP32 (standard form)", "sedeploy OpenVINO FP32 engine (squeeze-first)"
ORT_FP32, ORT_SQF = "ONNX Runtime FP32 (standard form)", "ONNX Runtime FP32 (squeeze-first)"
NNCF, INT8, INT8_SQF = "OpenVINO + NNCF INT8", "sedeploy int8-ov (standard form)", "int8-ov from squeeze-first"


def _random_model(depth: int, size: int, work: Path) -> Path:
    """The SE-fused FP32 artifact of a random-weight SE-ResNet, built as a user would (export, build-engine)."""
    import subprocess

    folder = work / f"se-resnet{depth}-{size}px"
    raw, fp32 = folder / f"se-resnet{depth}.onnx", folder / "engines" / f"se-resnet{depth}.fp32.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    if not raw.is_file():
        subprocess.run([sys.executable, "-m", "sedeploy", "export", "--depth", str(depth), "--input-size", str(size),
                        "-o", str(raw)], check=True)
    if not fp32.is_file():
        subprocess.run([sys.executable, "-m", "sedeploy", "build-engine", str(raw), "--backend", "none", "-o",
                        str(folder / "engines")], check=True)
    return fp32


def measure(fp32: Path, pp, calib_paths: list[Path], x_time: np.ndarray, work: Path, repeats: int, *,
            method: str, val: tuple[np.ndarray, np.ndarray] | None = None) -> dict:

    from common import time_activated
    from sedeploy.backends import EngineOptions
    from sedeploy.backends.openvino import OpenVinoModelRunner, OpenVinoRunner, build_engine
    from sedeploy.backends.ort import OrtRunner
    from sedeploy.bench.peers import nncf_int8
    from sedeploy.backends.timing import paired_speedup
    from sedeploy.quantize import calibrate
    from sedeploy.quantize import quantize_model
    from sedeploy.onnxcore import load_onnx, save_onnx
    from sedeploy.passes import squeeze_first
    from sedeploy.preprocess import load_batch

    work.mkdir(parents=True, exist_ok=True)
    rewritten, report = squeeze_first(load_onnx(fp32))
    sqf = save_onnx(rewritten, work / fp32.name.replace(".fp32.onnx", ".sqf.fp32.onnx"))
    engine = build_engine(fp32, work / "ov", EngineOptions(threads=2))
    folder = work / "calib-images"  # calibrate() takes a folder: link the chosen images into one
    folder.mkdir(exist_ok=True)
    for p in calib_paths:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    arts = {}
    for name, src in ((INT8, fp32), (INT8_SQF, sqf)):
        cal = calibrate(src, folder, method=method, count=len(calib_paths), preprocess=pp, progress=False,
                        cache_dir=work / "cache")
        arts[name] = quantize_model(src, cal, work / src.name.replace(".fp32.onnx", ".int8-ov.onnx"),
                                    flavour="ov").path
    cx, _ = load_batch(calib_paths, pp)
    nncf_model = nncf_int8(fp32, cx, f"{len(cx)} calibration images")
    res: dict = {"squeeze_first_rewrites": report.rewritten, "calibration_images": len(calib_paths),
                 "calibration_method": method, "rows": {}}
    if val is not None:
        x, y = val
        ref = run_logits(fp32, "ov", "fp32", x)
        res["fp32_top1_pct"] = pct(ref.argmax(1) == y)
        for name, path, prec in ((ENGINE_FP32, engine.path, "fp32"), (INT8, arts[INT8], "int8"),
                                 (INT8_SQF, arts[INT8_SQF], "int8")):
            got = run_logits(path, "ov", prec, x)
            res["rows"][name] = {"agreement_pct": pct(got.argmax(1) == ref.argmax(1)), "top1_pct": pct(got.argmax(1) == y)}
        with OpenVinoModelRunner(nncf_model, precision="int8", threads=2) as r:
            got = np.concatenate([r.infer(x[i:i + 64]) for i in range(0, len(x), 64)])
        res["rows"][NNCF] = {"agreement_pct": pct(got.argmax(1) == ref.argmax(1)), "top1_pct": pct(got.argmax(1) == y)}
        print({k: v for k, v in res["rows"].items()}, flush=True)
    groups = {  # each runtime's engines interleaved among themselves: two runtimes' thread pools never alternate
        "OpenVINO": {PEER_FP32: OpenVinoModelRunner(fp32, precision="fp32", threads=2),
                     ENGINE_FP32: OpenVinoRunner(engine.path, threads=2),
                     NNCF: OpenVinoModelRunner(nncf_model, precision="int8", threads=2),
                     INT8: OpenVinoModelRunner(arts[INT8], precision="int8", threads=2),
                     INT8_SQF: OpenVinoModelRunner(arts[INT8_SQF], precision="int8", threads=2)},
        "ONNX Runtime": {ORT_FP32: OrtRunner(fp32, threads=2), ORT_SQF: OrtRunner(sqf, threads=2)}}
    for runtime, runners in groups.items():
        t = time_activated(runners, x_time, batch_sizes=(1, 8), warmup=3, repeats=repeats, settle=1)
        base = next(iter(runners))
        for name in runners:
            row = res["rows"].setdefault(name, {})
            row["runtime"] = runtime
            for b in (1, 8):
                s = np.asarray(t.samples[name][b])
                q1, q3 = np.percentile(s, [25, 75])
                row[f"b{b}"] = {"median_ms": round(float(np.median(s)) * 1e3, 2),
                                "iqr_pct": round(100 * float(q3 - q1) / float(np.median(s)), 1),
                                "x_fp32": round(paired_speedup(t.samples[base][b], s), 3),
                                "x_nncf": (round(paired_speedup(t.samples[NNCF][b], s), 3) if NNCF in runners
                                           else None)}
    res["rounds"] = repeats
    res["profile_b8_ms"] = profile({NNCF: nncf_model, INT8: arts[INT8], INT8_SQF: arts[INT8_SQF]},
                                   np.resize(x_time, (8, *x_time.shape[1:])))
    return res


def layer_role(layer: dict) -> str:
    """The part of the network an OpenVINO layer belongs to (sedeploy's fused SE nodes are named …/squeeze,
    …/fc1, …/fc2, …/gate, …/scale; NNCF quantizes the same FP32 graph, so its layers carry the same names)."""
    name = layer["name"]
    if "/squeeze" in name:
        return "SE squeeze"
    if "/fc1" in name or "/fc2" in name:
        return "SE FCs (+ gate)"
    if layer["type"] == "Subgraph" and not name.startswith("input"):  # (the input's quantization is one too)
        return "SE scale + residual add + ReLU (fused)"
    if layer["type"] == "Convolution":
        return "convolutions"
    return "other"


def profile(models: dict, x: np.ndarray, runs: int = 15) -> dict:
    """Median per-role time (ms) from OpenVINO's per-layer counters; the runners alternate call by call."""
    from sedeploy.backends.openvino import OpenVinoModelRunner

    runners = {n: OpenVinoModelRunner(m, precision="int8", threads=2, perf_counters=True) for n, m in models.items()}
    per = {n: {} for n in runners}
    try:
        for r in runners.values():
            r.activate()
            for _ in range(3):
                r.infer(x)
        for _ in range(runs):
            for n, r in runners.items():
                r.infer(x)
                sums: dict[str, float] = {}
                for layer in r.layer_times():
                    for key in (layer_role(layer), "total"):
                        sums[key] = sums.get(key, 0.0) + layer["real_us"] / 1e3
                for k, v in sums.items():
                    per[n].setdefault(k, []).append(v)
    finally:
        for r in runners.values():
            r.deactivate()
    return {n: {k: round(float(np.median(v)), 2) for k, v in d.items()} for n, d in per.items()}


def table(title: str, res: dict) -> list[str]:
    agree = any("agreement_pct" in r for r in res["rows"].values())
    head = ("| engine | runtime | b1 ms (IQR %) | b1 × FP32 | b1 × NNCF | b8 ms (IQR %) | b8 × FP32 | b8 × NNCF |"
            + (" agreement | top-1 |" if agree else ""))
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in res["rows"].items():
        cells = [name, r["runtime"]]
        for b in ("b1", "b8"):
            s = r[b]
            cells += [f"{s['median_ms']} ({s['iqr_pct']})", f"{s['x_fp32']:.3f}",
                      "–" if s["x_nncf"] is None else f"{s['x_nncf']:.3f}"]
        if agree:
            cells += [f"{r['agreement_pct']} %" if "agreement_pct" in r else "(reference)",
                      f"{r['top1_pct']} %" if "top1_pct" in r else f"{res.get('fp32_top1_pct')} %"]
        lines.append("| " + " | ".join(cells) + " |")
    prof = res.get("profile_b8_ms") or {}
    if prof:
        roles = [k for k in next(iter(prof.values())) if k != "total"]
        roles = sorted(set(roles).union(*(set(p) - {"total"} for p in prof.values())),
                       key=lambda k: -max(p.get(k, 0.0) for p in prof.values()))
        lines += ["", "Where the INT8 time goes at batch 8 (OpenVINO per-layer counters, ms, median of 15 calls):", "",
                  "| engine | total | " + " | ".join(roles) + " |", "|---|---|" + "---|" * len(roles)]
        for n, p in prof.items():
            lines.append(f"| {n} | {p.get('total', 0):.2f} | " + " | ".join(f"{p.get(k, 0.0):.2f}" for k in roles)
                         + " |")
    return lines + [""]


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    models = list(results)
    panels = (("FP32: × FP32 on the standard form, same runtime", [ENGINE_FP32, ORT_SQF], "x_fp32"),
              ("INT8 on OpenVINO: × OpenVINO + NNCF INT8", [INT8, INT8_SQF], "x_nncf"))
    for ax, (label, names, key) in zip(axes, panels):
        width = 0.8 / (2 * len(names))
        for i, m in enumerate(models):
            for j, n in enumerate(names):
                for k, b in enumerate(("b1", "b8")):
                    v = results[m]["rows"][n][b][key]
                    pos = i + (j * 2 + k) * width - 0.4 + width / 2
                    ax.bar(pos, v, width, color=f"C{j}", alpha=0.5 if b == "b1" else 1.0,
                           label=f"{n}, {'batch 1' if b == 'b1' else 'batch 8'}" if i == 0 else None)
        ax.axhline(1.0, color="k", lw=0.8)
        if key == "x_nncf":
            ax.axhline(1.1, color="r", lw=0.8, ls="--", label="target 1.1× NNCF")
        ax.set_xticks(range(len(models)), [m.replace(", ", "\n") for m in models], fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("speed-up (median of per-round ratios)")
        ax.legend(fontsize=6.5, loc="upper left", ncol=2)
        ax.set_ylim(0.8, 1.3)  # 1.0 = as fast as the reference; the bars start at 0.8 to show a few per cent
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reference_args(ap, repeats=30)
    ap.add_argument("--method", default="mse", help="calibration range method (sedeploy's default is mse)")
    ap.add_argument("--depths", type=int, nargs="*", default=[50, 101], help="random-weight models at 224 px")
    ap.add_argument("--skip-reference", action="store_true", help="only the random-weight models")
    ap.add_argument("--replot", action="store_true", help="only redraw speedups.png from the committed results.json")
    args = ap.parse_args(argv)
    from common import results_dir, write_results

    if args.replot:
        import json

        plot(json.loads((results_dir(__file__) / "results.json").read_text())["models"],
             results_dir(__file__) / "speedups.png")
        return 0
    from sedeploy.quantize import select_images
    from sedeploy.preprocess import Preprocess, find_images, load_batch

    results = {}
    if not args.skip_reference:
        if reference_missing(args):
            return 2
        fp32, pp, x, y = prepare(args.checkpoint, args.size, args.data, args.work)
        _, paths = select_images(args.data / "train", args.calib_count, 0)
        results[f"trained SE-ResNet-50, {args.size} px"] = measure(
            fp32, pp, paths, x[:8], args.work / "squeeze-first" / f"{args.size}px", args.repeats,
            method=args.method, val=(x, y))
    calib = BENCH.parent / "calib"
    pp224 = Preprocess.for_size(224)
    cpaths = find_images(calib, what="calibration").paths
    xt, _ = load_batch(cpaths[:8], pp224)
    for depth in args.depths:
        work = Path(tempfile.gettempdir()) / "sedeploy-squeeze-first"
        fp32 = _random_model(depth, 224, work)
        results[f"SE-ResNet-{depth} random, 224 px"] = measure(fp32, pp224, cpaths, xt, work / f"se{depth}",
                                                               args.repeats, method=args.method)
    lines = ["# Squeeze-first SE form on the CPU engines", "",
             "Interleaved in one process per model and runtime (OpenVINO's engines among themselves, then ONNX "
             "Runtime's: two runtimes' thread pools are never alternated on the 2 cores). 2 threads, warm-up 3, "
             f"settle 1, {args.repeats} rounds per batch size. Timer: one synchronous infer call, host numpy in → "
             "out. × FP32: over the same runtime's FP32 on the standard form (OpenVINO FP32 reading the "
             "`.fp32.onnx` is `bench --peers`' `peer:openvino-fp32`); × NNCF: over OpenVINO + NNCF INT8; both "
             "medians of per-round ratios (> 1: faster). Agreement: top-1 agreement with OpenVINO FP32 on the "
             "3,925 Imagenette val images (trained model only).", ""]
    for title, res in results.items():
        lines += table(f"{title} ({res['squeeze_first_rewrites']} SE squeezes moved; calibration "
                       f"{res['calibration_images']} images, {res['calibration_method']})", res)
    out = write_results(__file__, {"models": results}, "\n".join(lines), argv=argv)
    plot(results, results_dir(__file__) / "speedups.png")
    print("\n".join(lines))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
