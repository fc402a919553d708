"""Drift of the TensorRT INT8 artifact (Q/DQ inside the FP16 graph) against FP32, on ONNX Runtime CPU.

TensorRT cannot run here; ONNX Runtime 1.32's CPU provider executes the artifact itself (Cast→float16,
QuantizeLinear/DequantizeLinear with float16 scales, float16 Conv/Relu/…), so the drift is measured on
the very file TensorRT would build, not on a twin. Artifacts compared, all against the FP32 export's logits:

- ``fp16``          — the FP16 artifact (``.fp16.onnx``): FP16 rounding's own share of the drift;
- ``int8-trt``      — the new TensorRT INT8 artifact (``.int8-trt.onnx``: FP16 graph, float16 scales, opset 19)
  run the way sedeploy's ORT runner runs it (ORT optimizations on, its WeightBiasQuantization transformer off —
  see ``sedeploy/onnxcore/session.py``);
- ``int8-trt (ORT opt off)`` — the same file with every ORT graph optimization off: the ONNX semantics of the
  graph, op by op (what a faithful backend computes);
- ``int8-trt (ORT WeightBiasQuantization on)`` — the same file with ORT's default transformers: shows what that
  transformer does to float16 biases (kept for the record; not how sedeploy runs it);
- ``int8-trt-fp32graph (main)`` — the former TensorRT flavour (Q/DQ on the FP32 graph, float32 scales), written
  in a subprocess by the sedeploy checkout given as ``--main`` (the committed run used commit 868bb79:
  ``git worktree add /tmp/sedeploy-868bb79 868bb79``).

Model: SE-ResNet-50 with random weights (``build_model(50, seed)``: agreement with FP32 is what is measured; the
FP32 top-1 margin is recorded because small margins make flips cheap), or ``--checkpoint`` (the trained
reference ``~/.cache/sedeploy/reference/se-resnet50-imagenette.pth`` when it exists). Data: the first
``--images`` of ``../shared/data/imagenet-val-1300`` for drift, the last ``--calib-images`` (disjoint) for
calibration (percentile, sedeploy's default).

    PYTHONPATH=. python benchmarks/experiments/trt_artifact_drift.py --images 1000 --main /tmp/sedeploy-868bb79
    # ~15 min on 2 busy cores

Writes ``benchmarks/results/trt_artifact_drift/{results.json, results.md, drift.png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
REPO = BENCH.parent
DATA = REPO.parent / "shared" / "data" / "imagenet-val-1300"
OUT = BENCH / "results" / "trt_artifact_drift"
REFERENCE = Path.home() / ".cache" / "sedeploy" / "reference" / "se-resnet50-imagenette.pth"

_MAIN_SNIPPET = """
import sys
from sedeploy.quantize import CalibrationResult, calibrate
from sedeploy.quantize import quantize_model
from sedeploy.preprocess import Preprocess
cal = calibrate(sys.argv[1], sys.argv[2], method="percentile", count=None, progress=False, cache_dir=sys.argv[4])
quantize_model(sys.argv[1], cal, sys.argv[3], flavour="trt")
"""


def _drift(ref: np.ndarray, got: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    top5r, top5g = np.argsort(-ref, 1)[:, :5], np.argsort(-got, 1)[:, :5]
    return {"top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "top1_flips": int((ref.argmax(1) != got.argmax(1)).sum()),
            "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5r, top5g)])),
            "max_abs": float(d.max()), "mean_abs": float(d.mean()), "p99_abs": float(np.quantile(d, 0.99))}


def _logits(path: Path, x: np.ndarray, *, optimization: str = "all", disabled=None, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    from sedeploy.onnxcore import cpu_session, run_model

    if disabled is None:
        sess = cpu_session(path, optimization=optimization)
    else:  # ORT with exactly the given transformers disabled ([] = ORT's defaults, none disabled)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return np.concatenate([run_model(sess, x[i:i + batch]) for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="drift images (first N of imagenet-val-1300)")
    ap.add_argument("--calib-images", type=int, default=128, help="calibration images (the last N, disjoint)")
    ap.add_argument("--seed", type=int, default=0, help="random-weight seed")
    ap.add_argument("--checkpoint", default=None, help="trained weights (default: the reference if present)")
    ap.add_argument("--main", required=True,
                    help="a sedeploy checkout whose TensorRT flavour is Q/DQ on the FP32 graph (commit 868bb79)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if not (DATA / "labels.tsv").is_file():
        print(f"{DATA} is absent: this benchmark needs the research images (../shared/data).")
        return 2
    import onnx
    import onnxruntime
    import torch

    from sedeploy.quantize import calibrate
    from sedeploy.export import export_onnx
    from sedeploy.fp16 import convert_fp16
    from sedeploy.quantize import quantize_model
    from sedeploy.model import build_model
    from sedeploy.preprocess import Preprocess, load_batch

    checkpoint = args.checkpoint or (str(REFERENCE) if REFERENCE.is_file() else None)
    rows = [line.split("\t") for line in (DATA / "labels.tsv").read_text().splitlines() if line.strip()]
    files = [DATA / "images" / r[0] for r in rows]
    labels = np.array([int(r[1]) for r in rows])
    eval_files, calib_files = files[:args.images], files[-args.calib_images:]
    if set(eval_files) & set(calib_files):
        raise SystemExit(f"--images {args.images} + --calib-images {args.calib_images} > {len(files)}: they overlap")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trt-drift-") as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib"
        calib.mkdir()
        for f in calib_files:  # links, not copies: the images stay in ../shared
            os.symlink(f, calib / f.name)
        model = build_model(50, seed=args.seed)
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        fp32 = export_onnx(model.eval(), tmp / "m.onnx", input_size=224)
        cal = calibrate(fp32, calib, method="percentile", count=None, progress=False, cache_dir=tmp / "cc")
        paths = {"fp16": tmp / "m.fp16.onnx", "int8-trt": tmp / "m.int8-trt.onnx",
                 "int8-trt-fp32graph (main)": tmp / "m.int8-trt-main.onnx"}
        fp16_report = convert_fp16(fp32, paths["fp16"])
        q = quantize_model(fp32, cal, paths["int8-trt"], flavour="trt")
        main_rev = subprocess.run(["git", "-C", args.main, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        subprocess.run([sys.executable, "-c", _MAIN_SNIPPET, str(fp32), str(calib),
                        str(paths["int8-trt-fp32graph (main)"]), str(tmp / "cc-main")], check=True, cwd=args.main,  # cwd: `-c` puts it first on sys.path
                       env={**os.environ, "PYTHONPATH": args.main})
        from sedeploy.checks import check_strong_typing

        main_opset = onnx.load(str(paths["int8-trt-fp32graph (main)"]), load_external_data=False).opset_import[0]
        if main_opset.version >= 19:
            raise SystemExit("the --main artifact is not today's FP32-graph flavour (opset ≥ 19): wrong checkout?")

        typing = {k: check_strong_typing(p).summary() for k, p in [("fp32", fp32), *paths.items()]}
        x, loaded = load_batch(eval_files, Preprocess())
        if len(loaded) != len(eval_files):
            raise SystemExit(f"{len(eval_files) - len(loaded)} drift image(s) could not be read")
        ref = _logits(fp32, x)
        top2 = np.sort(ref, 1)[:, -2:]
        runs = {"fp16": (paths["fp16"], {}), "int8-trt": (paths["int8-trt"], {}),
                "int8-trt (ORT opt off)": (paths["int8-trt"], {"optimization": "disabled"}),
                "int8-trt (ORT WeightBiasQuantization on)": (paths["int8-trt"], {"disabled": []}),
                "int8-trt-fp32graph (main)": (paths["int8-trt-fp32graph (main)"], {})}
        results = {}
        for name, (path, kw) in runs.items():
            t0 = time.perf_counter()
            got = _logits(path, x, **kw)
            results[name] = {**_drift(ref, got), "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name:45s} agreement {results[name]['top1_agreement']:.2%}  mean|Δ| "
                  f"{results[name]['mean_abs']:.4f}  max|Δ| {results[name]['max_abs']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "PYTHONPATH=. python benchmarks/experiments/trt_artifact_drift.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "model": {"depth": 50, "weights": checkpoint or f"random (build_model(50, seed={args.seed}))",
                  "trained_reference_present": REFERENCE.is_file()},
        "data": {"drift_images": len(eval_files), "calibration_images": len(calib_files), "folder": str(DATA),
                 "fp32_top1_vs_labels": float((ref.argmax(1) == labels[:len(eval_files)]).mean()),
                 "fp32_top1_margin_median": float(np.median(top2[:, 1] - top2[:, 0]))},
        "main_revision": main_rev, "int8_trt_settings": q.settings, "fp16_casts": fp16_report.casts,
        "strong_typing": typing, "results": results, "seconds": round(time.perf_counter() - t_all, 1),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    _markdown(doc, out / "results.md")
    _plot(results, out / "drift.png", len(eval_files))
    print(f"wrote {out}/results.json, results.md, drift.png")
    return 0


def _markdown(doc: dict, path: Path) -> None:
    lines = ["# TensorRT INT8 artifact drift on ONNX Runtime CPU", "",
             f"Command: `{doc['command']}`  ", f"Model: SE-ResNet-50, {doc['model']['weights']} (trained reference "
             f"present: {doc['model']['trained_reference_present']}); {doc['data']['drift_images']} real ImageNet-val "
             f"images for drift, {doc['data']['calibration_images']} disjoint ones for calibration.  ",
             f"FP32 top-1 margin (median) {doc['data']['fp32_top1_margin_median']:.3f}; onnxruntime "
             f"{doc['versions']['onnxruntime']}; today's flavour from main @ {doc['main_revision']}.", "",
             "| artifact (how ORT runs it) | top-1 agreement | flips | top-5 overlap | mean abs Δlogit | p99 | max |",
             "|---|---|---|---|---|---|---|"]
    for name, r in doc["results"].items():
        lines.append(f"| {name} | {r['top1_agreement']:.2%} | {r['top1_flips']} | {r['top5_overlap']:.3f} | "
                     f"{r['mean_abs']:.4f} | {r['p99_abs']:.3f} | {r['max_abs']:.3f} |")
    lines += ["", "Strong typing (as TensorRT's strongly typed parser types each file): compute ops per float type", ""]
    for name, t in doc["strong_typing"].items():
        lines.append(f"- {name}: {t['compute_ops'] or 'none'}; {t['casts']} Cast(s); ok={t['ok']}")
    path.write_text("\n".join(lines) + "\n")


def _plot(results: dict, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.barh(names, [100 * results[k]["top1_agreement"] for k in names], color="tab:blue")
    a.set_xlabel(f"top-1 agreement with FP32, % ({n} images)")
    a.set_xlim(min(90, min(100 * results[k]["top1_agreement"] for k in names) - 1), 100)
    b.barh(names, [results[k]["mean_abs"] for k in names], color="tab:orange")
    b.set_xlabel("mean |Δlogit| vs FP32 (lower is better)")
    b.set_yticks([])
    fig.suptitle("SE-ResNet-50 artifacts vs FP32 on ONNX Runtime CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
