"""Which INT8 form runs fastest on ONNX Runtime CPU here, at what drift — and which SE policy to default to.

Builds, from ONE calibration of each model, the CPU-flavour variants of :mod:`sedeploy.quantize` (QOperator vs
QDQ U8S8, per-channel on/off, reduce_range on/off, Conv-only vs "everything uint8" (QLinearAdd/Mul/Sigmoid/
GlobalAveragePool), SE kept in FP32 or quantized) plus the TensorRT flavour, then

* times them against the FP32 model, interleaved (:func:`sedeploy.backends.timing.time_runners`, order rotated
  every round), 2 threads, ORT_ENABLE_ALL, batch 1 and 8; the speed-up is the median of per-round ratios, so a
  background load slows all forms alike;
* measures top-1 agreement and max |Δlogit| against FP32: on ~200 ImageNet validation images for SE-ResNet-50
  (random weights: weak evidence, logits of an untrained net are close together), on the 500 held-out
  images of the tiny *trained* SE-ResNet-18 of tests/tiny_trained.py, and — the number that decides — on
  Imagenette val for the trained reference SE-ResNet-50 (benchmarks/train_reference.py) at its training
  resolution, calibrated on Imagenette train.

Usage::

    python benchmarks/experiments/int8_cpu_forms.py --model /tmp/q/se50.onnx --calib calib \\
        --images ../shared/data/imagenet-val-1300/images --tiny-cache /tmp/q/tinycache \
        --trained ~/.cache/sedeploy/headline/reference-112.onnx --trained-size 112 \
        --trained-calib ../shared/data/imagenette/train --trained-images ../shared/data/imagenette/val

Writes benchmarks/results/int8_cpu_forms/results.json and .md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH))  # benchmarks/common.py
sys.path.insert(0, str(BENCH.parent / "tests"))

from sedeploy.backends.ort import OrtRunner  # noqa: E402
from sedeploy.backends.timing import paired_speedup, time_runners  # noqa: E402
from sedeploy.labels import resolve_labels  # noqa: E402
from sedeploy.quantize import DEFAULT_METHOD, calibrate  # noqa: E402
from sedeploy.preprocess import Preprocess, find_images, load_batch  # noqa: E402
from sedeploy.quantize import CPU_OPTIONS, CpuOptions, quantize_model  # noqa: E402

CONV_ONLY = ()
#: name → (flavour, se, CpuOptions or None)
VARIANTS = {
    "cpu qop U8S8 pc rr all-uint8 se=int8": ("cpu", "int8", CPU_OPTIONS),
    "cpu qop U8S8 pc rr all-uint8 se=fp32": ("cpu", "fp32", CPU_OPTIONS),
    "cpu qop U8S8 per-tensor rr all-uint8": ("cpu", "int8", CpuOptions(per_channel=False)),
    "cpu qop U8S8 pc no-rr all-uint8": ("cpu", "int8", CpuOptions(reduce_range=False)),
    "cpu qop U8S8 pc rr conv-only": ("cpu", "int8", CpuOptions(extra_ops=CONV_ONLY)),
    "cpu qop U8S8 pc rr no Sigmoid/Mul": ("cpu", "int8", CpuOptions(
        extra_ops=("Add", "GlobalAveragePool", "Relu", "MaxPool", "Reshape", "Flatten"))),
    "cpu qop U8S8 pc rr ReduceMean kept": ("cpu", "int8", CpuOptions(squeeze_as_gap=False)),
    "cpu qdq U8S8 pc rr": ("cpu", "int8", CpuOptions(format="qdq")),
    "trt (S8S8 QDQ) se=int8": ("trt", "int8", None),
    "trt (S8S8 QDQ) se=fp32": ("trt", "fp32", None),
}


def build(model: Path, calib, out: Path, names) -> dict:
    built = {}
    for name in names:
        flavour, se, opts = VARIANTS[name]
        path = out / (model.stem + "_" + "".join(c if c.isalnum() else "_" for c in name) + ".onnx")
        rep = quantize_model(model, calib, path, flavour=flavour, se=se, cpu_options=opts)
        built[name] = {"path": str(path), "report": rep.as_dict()}
        print(f"  built {name}: {rep.quantized_ops} ({rep.seconds}s)", flush=True)
    return built


def agreement(paths: dict[str, str], fp32: Path, images: np.ndarray, labels=None, batch: int = 16) -> dict:
    def logits(p):
        with OrtRunner(p, threads=2) as r:
            return np.concatenate([r.infer(images[i:i + batch]) for i in range(0, len(images), batch)])

    ref = logits(fp32)
    res = {"FP32": {"top1_agreement": 1.0, **({"accuracy": float((ref.argmax(1) == labels).mean())}
                                               if labels is not None else {})}}
    for name, p in paths.items():
        got = logits(p)
        d = np.abs(got - ref)
        res[name] = {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                     "max_abs_dlogit": float(d.max()), "mean_abs_dlogit": float(d.mean())}
        if labels is not None:
            res[name]["accuracy"] = float((got.argmax(1) == labels).mean())
        print(f"  {name}: {res[name]}", flush=True)
    return res


def speed(paths: dict[str, str], fp32: Path, batch_sizes, repeats: int, images: np.ndarray) -> dict:
    runners = {"FP32": OrtRunner(fp32, threads=2).activate()}
    runners.update({n: OrtRunner(p, threads=2).activate() for n, p in paths.items()})
    t = time_runners(runners, images, batch_sizes=batch_sizes, warmup=2, repeats=repeats)
    out = {}
    for b in batch_sizes:
        ref = t.samples["FP32"][b]
        out[str(b)] = {n: {"median_img_s": round(b / float(np.median(t.samples[n][b])), 2),
                           "speedup_vs_fp32": (round(paired_speedup(ref, t.samples[n][b]), 3)
                                               if n != "FP32" else 1.0),
                           "rounds": len(t.samples[n][b])} for n in runners}
        for n, v in out[str(b)].items():
            print(f"  b{b} {n}: {v}", flush=True)
    return out


def to_md(res: dict) -> str:
    L = ["# INT8 forms on ONNX Runtime CPU (SE-ResNet-50) and SE policy", "",
         f"Machine: {res['machine']}. ORT {res['onnxruntime']}, 2 threads, ORT_ENABLE_ALL. "
         f"Load average at start / end: {res.get('load_start')} / {res.get('load_end')}. Compare the "
         "**speed-up vs FP32** (median of per-round ratios, forms interleaved with rotation); absolute img/s "
         "move with machine load.", "",
         f"Calibration: {res['calibration']}.", "", "Command: `" + res["command"] + "`", ""]
    for b, rows in res["speed"].items():
        L += [f"## Speed, batch {b} ({next(iter(rows.values()))['rounds']} interleaved rounds)", "",
              "| form | img/s (median) | speed-up vs FP32 |", "|---|---|---|"]
        L += [f"| {n} | {v['median_img_s']} | {v['speedup_vs_fp32']:.2f}× |" for n, v in rows.items()]
        L.append("")
    for title, key in (("trained reference SE-ResNet-50, Imagenette val", "agreement_trained"),
                       ("SE-ResNet-50 (random weights) vs FP32 on ImageNet val images", "agreement_se50"),
                       ("Tiny trained SE-ResNet-18 (tests/tiny_trained.py), 500 held-out images", "agreement_tiny")):
        if key not in res:
            continue
        L += [f"## Drift: {title}", "", "| form | top-1 agreement | max abs dlogit | mean abs dlogit | accuracy |",
              "|---|---|---|---|---|"]
        for n, v in res[key].items():
            acc = f"{v['accuracy']:.1%}" if "accuracy" in v else ""
            L.append(f"| {n} | {v['top1_agreement']:.1%} | {v.get('max_abs_dlogit', 0):.3g} | "
                     f"{v.get('mean_abs_dlogit', 0):.3g} | {acc} |")
        L.append("")
    L += ["## Conclusions", "", *res.get("conclusions", []), ""]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="FP32 SE-ResNet-50 .onnx (sedeploy export)")
    ap.add_argument("--calib", default=str(BENCH.parent / "calib"))
    ap.add_argument("--method", default=DEFAULT_METHOD)
    ap.add_argument("--images", type=Path, help="real images for SE-50 agreement (ImageNet val)")
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--tiny-cache", type=Path, help="cache dir of tests/tiny_trained.py")
    ap.add_argument("--trained", type=Path, help="FP32 ONNX of the trained reference (sedeploy export --checkpoint)")
    ap.add_argument("--trained-size", type=int, default=112, help="its input size (training resolution)")
    ap.add_argument("--trained-calib", type=Path, help="calibration images for it (Imagenette train)")
    ap.add_argument("--trained-calib-count", type=int, default=512)
    ap.add_argument("--trained-images", type=Path, help="labelled evaluation images (Imagenette val)")
    ap.add_argument("--trained-n", type=int, default=0, help="evaluation images (0: all)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sedeploy-int8-forms"))
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--conclusions", type=Path, help="markdown lines to append under 'Conclusions'")
    a = ap.parse_args()
    import onnxruntime

    a.out.mkdir(parents=True, exist_ok=True)
    res = {"machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                      f"cores", "onnxruntime": onnxruntime.__version__, "command": " ".join(sys.argv),
           "variants": {n: {"flavour": VARIANTS[n][0], "se": VARIANTS[n][1],
                            "cpu_options": VARIANTS[n][2].as_dict() if VARIANTS[n][2] else None}
                        for n in a.variants}}
    res["load_start"] = [round(v, 2) for v in __import__("os").getloadavg()]
    cal = calibrate(a.model, a.calib, method=a.method, cache_dir=a.out / "cache", progress=False)
    res["calibration"] = f"{cal.method} on {len(cal.images)} images of {a.calib} (key {cal.key[:12]}…)"
    t0 = time.time()
    built = build(a.model, cal, a.out, a.variants)
    res["built"] = {n: b["report"] for n, b in built.items()}
    paths = {n: b["path"] for n, b in built.items()}
    pool = None
    if a.images:
        found = find_images(a.images)
        rng = np.random.default_rng(0)
        sel = sorted(rng.choice(len(found.paths), size=min(a.n_images, len(found.paths)), replace=False))
        pool, _ = load_batch([found.paths[i] for i in sel], Preprocess())
        res["agreement_se50"] = agreement(paths, a.model, pool)
    if a.tiny_cache:
        from tiny_trained import tiny_trained

        art = tiny_trained(a.tiny_cache)
        tcal = calibrate(art.onnx_path, art.calib_dir, method=a.method, cache_dir=a.out / "cache", progress=False,
                         preprocess=art.preprocess)
        tiny_paths = {n: b["path"] for n, b in build(Path(art.onnx_path), tcal, a.out, a.variants).items()}
        res["agreement_tiny"] = agreement(tiny_paths, art.onnx_path, art.images, art.labels, batch=100)
    if a.trained:
        pp = Preprocess.for_size(a.trained_size)
        rcal = calibrate(a.trained, a.trained_calib, method=a.method, count=a.trained_calib_count,
                         cache_dir=a.out / "cache", progress=False, preprocess=pp)
        r_paths = {n: b["path"] for n, b in build(a.trained, rcal, a.out, a.variants).items()}
        found = find_images(a.trained_images)
        sel = found.paths
        if a.trained_n:
            rng = np.random.default_rng(0)
            sel = [found.paths[i] for i in sorted(rng.choice(len(found.paths), size=min(a.trained_n, len(sel)),
                                                             replace=False))]
        x, loaded = load_batch(list(sel), pp)
        lab = resolve_labels(loaded, a.trained_images, num_classes=10)
        res["trained_calibration"] = f"{rcal.method} on {len(rcal.images)} images of {a.trained_calib}"
        res["agreement_trained"] = agreement(r_paths, a.trained, x, lab.indices, batch=64)
    imgs = pool if pool is not None else np.random.default_rng(0).standard_normal((8, 3, 224, 224), np.float32)
    res["speed"] = speed(paths, a.model, [1, 8], a.repeats, imgs)
    res["seconds"] = round(time.time() - t0, 1)
    res["load_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    if a.conclusions and a.conclusions.exists():
        res["conclusions"] = a.conclusions.read_text().splitlines()
    from common import write_results  # noqa: E402  (benchmarks/common.py)

    print("wrote", write_results(__file__, res, to_md(res)))


if __name__ == "__main__":
    main()
