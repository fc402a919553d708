"""Reproduce sedeploy's headline table: speed, drift and cost-vs-FLOPs of every engine, with the sedeploy CLI.

Everything goes through the command line a user would type (`sedeploy build-engine`, `sedeploy bench`), so the
table measures the product, not a side path. Stages:

  speed    SE-ResNet-50 and -101 (random weights: speed does not depend on them): PyTorch eager FP32, the
           plain ResNet (no SE), FP32 unfused and SE-fused, FP16, INT8 CPU and INT8 TensorRT flavours on
           ONNX Runtime CPU, batch 1/8/32, all timed interleaved in one run per model; top-1 agreement with
           FP32 on real ImageNet val images.
  flops    SE-ResNet-18/34/152 (FP32 + INT8 CPU, batch 1 and 8, fewer repeats): points for throughput vs FLOPs.
  drift    the trained reference SE-ResNet-50 (benchmarks/train_reference.py; 10 Imagenette classes):
           top-1 of every engine on Imagenette val (3,925 images) at its training resolution (112 px), and on
           a subset at 224 px.

Outputs in --out (default benchmarks/results/headline): one folder per run with sedeploy's results.{json,csv,md} and
plots, plus headline.json / headline.md (the table in docs/results.md) and throughput_vs_gflops.png.

    python benchmarks/headline.py                    # ≈ 40 min on a 2-core CPU
    python benchmarks/headline.py --stages speed --depths 50 --repeats 5      # a quicker look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sedeploy.layout import Manifest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGENET = SHARED / "imagenet-val-1300"
IMAGENETTE = SHARED / "imagenette"
STAGES = ("speed", "flops", "drift")


def sh(*args: str, log: Path | None = None) -> dict:
    """Run one sedeploy command with --json; return its JSON (stderr streams to the terminal / log)."""
    cmd = ["sedeploy", *args, "--json"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode not in (0, 1):  # 1: a bench budget was exceeded, results still valid
        sys.exit(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return json.loads(proc.stdout)


def build(work: Path, depth: int, *extra: str, name: str | None = None) -> Path:
    out = work / (name or f"se-resnet{depth}")
    if not Manifest.present(out):
        sh("build-engine", "--depth", str(depth), "--int8", "--backend", "none", "-o", str(out), *extra)
    return out


def artifacts(folder: Path) -> dict[str, Path]:
    m = Manifest.read(folder)
    return {a["precision"] + (f"-{a['flavour']}" if a.get("flavour") else ""): m.locate(a["path"])
            for a in m.artifacts}


def unfused_copy(folder: Path, source: Path) -> Path:
    """The FP32 graph without the SE pass, for the fused-vs-unfused row."""
    target = folder / f"{source.stem}.unfused.onnx"
    if not target.exists():
        tmp = folder / "_unfused"
        sh("build-engine", str(source), "--no-fuse-se", "--backend", "none", "-o", str(tmp))
        shutil.move(str(next(tmp.glob("*.fp32.onnx"))), target)
        shutil.rmtree(tmp)
    return target


def tensorrt_status() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else the reason the TensorRT rows are left out."""
    from sedeploy.backends.tensorrt import require_trt
    from sedeploy.errors import SedeployError

    try:
        require_trt("TensorRT rows of the headline benchmark")
    except SedeployError as err:
        return str(err).splitlines()[0]
    return None


def trt_plans(folder: Path, arts: dict[str, Path]) -> list[Path]:
    """TensorRT plans built from the same portable artifacts the ONNX Runtime rows use (FP32, FP16, INT8 Q/DQ)."""
    plans = []
    for key in ("fp32", "fp16", "int8-trt"):
        target = folder / "trt" / key
        if not Manifest.present(target):
            sh("build-engine", str(arts[key]), "--backend", "trt", "--opt-batch", "8", "--max-batch", "32",
               "-o", str(target))
        m = Manifest.read(target)
        plans += [m.locate(e["path"]) for e in m.engines if e["backend"] == "trt"]
    return plans


def stage_speed(args, work: Path, out: Path) -> list[dict]:
    runs = []
    trt_missing = tensorrt_status()
    if trt_missing:
        print(f"TensorRT rows left out: {trt_missing}", file=sys.stderr, flush=True)
    for depth in args.depths:
        folder = build(work, depth, "--fp16")
        arts = artifacts(folder)
        unfused = unfused_copy(folder, folder / f"se-resnet{depth}.onnx")
        engines = [arts["fp32"], unfused, arts["fp16"], arts["int8-cpu"], arts["int8-trt"]]
        if not trt_missing:
            engines += trt_plans(folder, arts)
        img = ["--images", str(IMAGENET / "images"), "--labels", str(IMAGENET / "labels.tsv"),
               "--image-limit", str(args.agreement_images)] if IMAGENET.exists() else []
        res = sh("bench", *map(str, engines), "--reference", str(arts["fp32"]), "--compare-plain",
                 "--batch", "1,8,32", "--repeats", str(args.repeats if depth <= 50 else max(3, args.repeats // 2)),
                 "--threads", str(args.threads), *img, "--out", str(out / f"speed-se-resnet{depth}"))
        runs.append({"stage": "speed", "depth": depth, "results": res, "tensorrt_rows": trt_missing or "included"})
    return runs


def stage_flops(args, work: Path, out: Path) -> list[dict]:
    runs = []
    for depth in (18, 34, 152):
        arts = artifacts(build(work, depth))
        res = sh("bench", str(arts["fp32"]), str(arts["int8-cpu"]), "--batch", "1,8",
                 "--repeats", str(max(3, args.repeats // 3)), "--threads", str(args.threads), "--no-probe",
                 "--out", str(out / f"flops-se-resnet{depth}"))
        runs.append({"stage": "flops", "depth": depth, "results": res})
    return runs


def stage_drift(args, work: Path, out: Path) -> list[dict]:
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        sys.exit(f"trained reference checkpoint '{ckpt}' not found: run benchmarks/train_reference.py first")
    runs = []
    for size, limit in ((112, None), (224, args.drift_224_images)):
        folder = work / f"reference-{size}"
        if not Manifest.present(folder):
            sh("export", "--checkpoint", str(ckpt), "--input-size", str(size), "-o",
               str(work / f"reference-{size}.onnx"))
            sh("build-engine", str(work / f"reference-{size}.onnx"), "--fp16", "--int8", "--calib",
               str(IMAGENETTE / "train"), "--calib-count", "512", "--backend", "none", "-o", str(folder))
        arts = artifacts(folder)
        lim = ["--image-limit", str(limit)] if limit else []
        res = sh("bench", *(str(arts[k]) for k in ("fp32", "fp16", "int8-cpu", "int8-trt")),
                 "--checkpoint", str(ckpt), "--images", str(IMAGENETTE / "val"), *lim, "--batch", "32",
                 "--warmup", "1", "--repeats", "3", "--threads", str(args.threads), "--no-probe",
                 "--out", str(out / f"drift-reference-{size}"))
        runs.append({"stage": "drift", "size": size, "results": res})
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--depths", default="50,101", help="depths for the speed stage")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per engine and batch (speed stage)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--agreement-images", type=int, default=300, help="ImageNet val images for agreement")
    ap.add_argument("--drift-224-images", type=int, default=800, help="Imagenette val images at 224 px")
    ap.add_argument("--checkpoint", default=str(Path(os.environ.get("SEDEPLOY_CACHE", Path.home() / ".cache" /
                                                                    "sedeploy")) / "reference" /
                                                "se-resnet50-imagenette.pth"))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SEDEPLOY_CACHE", Path.home() / ".cache" /
                                                                     "sedeploy")) / "headline")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "headline")
    args = ap.parse_args(argv)
    args.depths = [int(d) for d in args.depths.split(",")]
    stages = args.stages.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for stage in stages:
        runs += {"speed": stage_speed, "flops": stage_flops, "drift": stage_drift}[stage](args, args.work, args.out)
    from headline_table import write_headline  # noqa: E402  (beside this script)

    write_headline(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
