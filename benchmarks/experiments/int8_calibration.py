"""Which base calibration makes the best INT8 model before any layer falls back? (both flavours)

For each model, range estimator (percentile 99.99 % = the default, per-tensor MSE, entropy, min/max) and bias
correction (off/on), quantize with every layer in INT8 (no fallback, default SE policy) and compare with FP32 on
held-out images: top-1 agreement, top-1 drop (where labelled) and mean KL(FP32 ‖ INT8). Models:

- ``tiny``: the tiny trained SE-ResNet-18 of tests/tiny_trained.py (32 px, 10 synthetic classes): 64 calibration
  images, 500 held-out.
- ``foreign``: the third-party-style MobileNetV3-like model of tests/foreign_model.py (fixed batch 1, 48 px, 1001
  classes, Softmax, hard-sigmoid SE): 64 calibration images, 300 held-out; compared on log-probabilities.
- ``se50-random``: SE-ResNet-50 with seeded *random* weights at 224 px on real ImageNet validation images
  (../shared/data/imagenet-val-1300: 64 calibration, the next ``--se50-images`` held out). Random-weight logits
  sit close together, so agreement there is weak evidence; the KL column is the comparable figure. The trained
  reference checkpoint (~/.cache/sedeploy/reference/) and any trained third-party ImageNet model are not
  available on this machine (no network beyond PyPI), so no trained ImageNet figure is claimed.

Evaluation runs ONNX Runtime CPU on the artifacts (the TensorRT flavour's Q/DQ graph emulates its arithmetic on the
CPU). Writes benchmarks/results/int8_calibration/{results.json,results.md,kl.png} (or --out).

    PYTHONPATH=. python benchmarks/experiments/int8_calibration.py [--models tiny,foreign,se50-random] \
        [--se50-images 192]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "int8_calibration"
CACHE = Path(os.environ.get("SEDEPLOY_TEST_CACHE") or Path(tempfile.gettempdir()) / "sedeploy-bench-models")
METHODS = ("percentile", "mse", "entropy", "minmax")


def _tiny():
    from tiny_trained import tiny_trained

    a = tiny_trained(CACHE)
    return a.onnx_path, a.calib_dir, a.preprocess, a.images, a.labels, None


def _foreign():
    from foreign_model import foreign_model

    a = foreign_model(CACHE)
    return a.onnx_path, a.calib_dir, a.preprocess, a.images, a.labels, None


def _se50(n_images: int):
    from sedeploy.labels import resolve_labels
    from sedeploy.export import export_model
    from sedeploy.preprocess import Preprocess, find_images, load_batch

    work = CACHE / "se50-random"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "se-resnet50-random.onnx"
    if not path.exists():
        export_model(depth=50, output=path, seed=0)
    val = DATA / "imagenet-val-1300"
    found = find_images(val / "images")
    calib = work / "calib"
    if not calib.exists():  # the first 64 files, linked (never copied into the repo)
        calib.mkdir()
        for p in found.paths[:64]:
            (calib / p.name).symlink_to(p)
    pp = Preprocess()
    held = found.paths[64:64 + n_images]
    x, loaded = load_batch(held, pp, progress=False)
    labels = resolve_labels(loaded, val / "images", num_classes=1000, labels_file=val / "labels.tsv").indices
    return path, calib, pp, x, labels, "random weights: agreement is weak evidence, compare KL"


def _fuse(src: Path, work: Path) -> Path:
    from sedeploy.onnxcore import load_onnx, save_onnx
    from sedeploy.passes import fuse_se_blocks

    fused, _ = fuse_se_blocks(load_onnx(src))
    return save_onnx(fused, work / (src.stem + ".fused.onnx"))


def measure(name, spec, work: Path, methods=METHODS) -> list[dict]:
    from sedeploy import quantize
    from sedeploy.metrics import as_logits, metrics
    from sedeploy.onnxcore import load_onnx, output_kind, run_model

    src, calib_dir, pp, x, labels, caveat = spec
    fp32 = _fuse(src, work)
    kind = output_kind(load_onnx(fp32, check=False))
    ref = as_logits(run_model(fp32, x), kind)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        cal = quantize.calibrate(fp32, calib_dir, method=method, count=64, preprocess=pp, progress=False,
                                 use_cache=False)
        t_cal = time.perf_counter() - t0
        for flavour in ("cpu", "trt"):
            for bc in (False, True):
                out = work / f"{name}-{method}-{flavour}-{int(bc)}.onnx"
                quantize.quantize_model(fp32, cal, out, flavour=flavour, bias_correction=bc)
                m = metrics(ref, as_logits(run_model(out, x), kind), labels)
                rows.append({"model": name, "method": method, "flavour": flavour, "bias_correction": bc,
                             "images": int(len(x)), "calibration_s": round(t_cal, 2), **m,
                             **({"caveat": caveat} if caveat else {})})
                print(json.dumps(rows[-1]), flush=True)
                out.unlink()
    return rows


def write(rows: list[dict], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import onnxruntime

    from sedeploy.bench.report import machine_description

    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": machine_description(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "loadavg_end": list(os.getloadavg()),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# INT8 base calibration: range estimator × bias correction (no fallback)", "",
             f"Command: `{command}`  ", f"Machine: {meta['machine'].get('cpu', '?')}, onnxruntime "
             f"{meta['onnxruntime']}, {meta['date_utc']} UTC", "",
             "| model | flavour | method | bias corr. | images | agreement % | top-1 drop pt | mean KL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['flavour']} | {r['method']} | {'on' if r['bias_correction'] else 'off'} "
                     f"| {r['images']} | {r['agreement_pct']:.2f} | {r.get('top1_drop_pts', 0):+.2f} "
                     f"| {r['mean_kl']:.2e} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        labels = [f"{r['flavour']}\n{r['method']}\n{'BC' if r['bias_correction'] else ''}" for r in sub]
        ax.bar(range(len(sub)), [r["mean_kl"] for r in sub],
               color=["tab:blue" if r["flavour"] == "cpu" else "tab:orange" for r in sub])
        ax.set_xticks(range(len(sub)), labels, fontsize=5)
        ax.set_yscale("log")
        ax.set_title(f"{model}: mean KL(FP32‖INT8), lower is better\n(blue: CPU flavour, orange: TensorRT)",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kl.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,foreign,se50-random")
    ap.add_argument("--se50-images", type=int, default=192)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(OUT), help="results folder (one per run; merge by hand)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8cal-") as tmp:
        for name in args.models.split(","):
            spec = {"tiny": _tiny, "foreign": _foreign}.get(name)
            spec = spec() if spec else _se50(args.se50_images)
            rows += measure(name, spec, Path(tmp), args.methods.split(","))
    write(rows, Path(args.out),
          "PYTHONPATH=. python " + " ".join(["benchmarks/experiments/int8_calibration.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
