"""Measure the FP16 artifact's keep-FP32 policies on SE-ResNet-50: logit drift, top-1 agreement, ORT CPU speed.

For each policy (nothing kept, the SE gate, the whole SE branch, the head, and two combinations) the FP32 export
is converted with :func:`sedeploy.fp16.convert_fp16`, then

- drift: FP16 vs FP32 logits on the first ``--images`` real images of ``--data`` (max / mean / p99 |Δlogit|,
  top-1 agreement, top-5 overlap); the FP32 logits' top-1 margin is recorded beside it, because on random
  weights a small margin makes top-1 flips cheap;
- speed: every FP16 variant and the FP32 model timed interleaved (round-robin, order rotated each round) at
  batch 1 in ONNX Runtime CPU; the headline is the paired ratio FP16 time / FP32 time (< 1: FP16 faster).

This is what :data:`sedeploy.fp16.DEFAULT_KEEP_FP32` is chosen from. Random weights (``build_model(50)``)
unless ``--checkpoint`` points at trained ones. Results: ``benchmarks/results/fp16_policy/results.json`` and ``.md``.

    python benchmarks/fp16_policy.py                      # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
POLICIES = ("none", "se_gate", "se", "head", "se_gate,head", "se,head")


def _export(path: Path, checkpoint: str | None) -> Path:
    from sedeploy.export import export_onnx
    from sedeploy.model import build_model

    if path.exists():
        return path
    model = build_model(50)
    if checkpoint:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    return export_onnx(model.eval(), path, input_size=224)


def _logits(path: Path, x: np.ndarray, threads: int, batch: int = 16) -> np.ndarray:
    from sedeploy.backends.ort import OrtRunner

    with OrtRunner(path, threads=threads) as runner:
        return np.concatenate([runner.infer(x[i:i + batch]) for i in range(0, len(x), batch)])


def _drift(ref: np.ndarray, got: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    top5r, top5g = np.argsort(-ref, 1)[:, :5], np.argsort(-got, 1)[:, :5]
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "p99_abs": float(np.quantile(d, 0.99)),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "top1_flips": int((ref.argmax(1) != got.argmax(1)).sum()),
            "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5r, top5g)])),
            "finite": bool(np.all(np.isfinite(got)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sedeploy-fp16-policy", help="folder for the exported models")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/imagenet-val-1300/images"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds at batch 1")
    ap.add_argument("--checkpoint", default=None, help="trained SE-ResNet-50 state_dict (default: random weights)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from sedeploy.backends.ort import OrtRunner
    from sedeploy.bench.timing import paired_speedup, time_runners
    from sedeploy.fp16 import DEFAULT_KEEP_FP32, convert_fp16
    from sedeploy.preprocess import Preprocess, load_folder

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp32 = _export(work / "se50.onnx", args.checkpoint)
    x, paths = load_folder(args.data, Preprocess(), limit=args.images)
    ref = _logits(fp32, x, args.threads)
    srt = np.sort(ref, 1)
    margin = srt[:, -1] - srt[:, -2]
    results: dict = {"policies": {}}
    for policy in POLICIES:
        out = work / f"se50_fp16_{policy.replace(',', '+')}.onnx"
        rep = convert_fp16(fp32, out, keep_fp32=policy)
        got = _logits(out, x, args.threads)
        results["policies"][policy] = {
            "path": str(out), "drift": _drift(ref, got), "nodes_fp16": rep.nodes_fp16, "nodes_fp32": rep.nodes_fp32,
            "casts": rep.casts, "fp16_weight_fraction": rep.fp16_weight_fraction,
            "kept_fp32_nodes": {k: len(v) for k, v in rep.kept_fp32_nodes.items()}}
        print(policy, json.dumps(results["policies"][policy]["drift"]), flush=True)

    runners = {"fp32": OrtRunner(fp32, threads=args.threads).activate()}
    runners.update({p: OrtRunner(results["policies"][p]["path"], threads=args.threads).activate() for p in POLICIES})
    timing = time_runners(runners, x, batch_sizes=(1,), warmup=3, repeats=args.repeats)
    for p in POLICIES:
        st = timing.stats(p, 1)
        results["policies"][p]["speed_b1"] = {
            "p50_ms": st["latency_ms"]["p50"], "fp32_p50_ms": timing.stats("fp32", 1)["latency_ms"]["p50"],
            # paired_speedup = median(fp32 / fp16); its inverse is the FP16/FP32 time ratio
            "time_ratio_fp16_over_fp32": 1.0 / paired_speedup(timing.samples["fp32"][1], timing.samples[p][1])}
    results.update({
        "model": "SE-ResNet-50 " + (f"weights {args.checkpoint}" if args.checkpoint else "random weights (seed 0)"),
        "input_size": 224, "images": len(x), "data": args.data,
        "fp32_top1_margin": {"median": float(np.median(margin)), "min": float(margin.min())},
        "fp32_logit_std": float(ref.std()), "fp32_distinct_top1": int(len(set(ref.argmax(1)))),
        "timing": {"batch": 1, "threads": args.threads, "repeats": args.repeats,
                   "interleaving": timing.config["interleaving"],
                   "note": "machine shared with a CPU training job: absolute times are disturbed; ratios are "
                           "paired per round"},
        "default_keep_fp32": list(DEFAULT_KEEP_FP32), "onnxruntime": ort.__version__,
        "python": platform.python_version(), "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/fp16_policy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    from common import write_results  # noqa: E402  (beside this script)

    print("wrote", write_results(__file__, results, _markdown(results), argv=argv))
    print(_markdown(results))
    return 0


def _markdown(r: dict) -> str:
    lines = [
        "# FP16 artifact: keep-FP32 policies on SE-ResNet-50", "",
        f"Command: `{r['command'].strip()}` (ONNX Runtime {r['onnxruntime']}, CPU, {r['timing']['threads']} "
        f"threads). Model: {r['model']}, {r['input_size']} px; drift on {r['images']} real images "
        f"({r['data']}). FP32 logits: std {r['fp32_logit_std']:.3g}, {r['fp32_distinct_top1']} distinct top-1 "
        f"classes, top-1 margin median {r['fp32_top1_margin']['median']:.3g} / min "
        f"{r['fp32_top1_margin']['min']:.3g}.", "",
        "| keep FP32 | FP32 nodes | Casts | FP16 weights | max abs Δlogit | mean abs Δlogit | top-1 agreement "
        "| top-5 overlap | time FP16/FP32 (b1) |",
        "|---|---|---|---|---|---|---|---|---|"]
    pol = r["policies"].values()
    spread = (min(v["drift"]["max_abs"] for v in pol), max(v["drift"]["max_abs"] for v in pol))
    agree = (min(v["drift"]["top1_agreement"] for v in pol), max(v["drift"]["top1_agreement"] for v in pol))
    speed = (min(v["speed_b1"]["time_ratio_fp16_over_fp32"] for v in pol),
             max(v["speed_b1"]["time_ratio_fp16_over_fp32"] for v in pol))
    for p, v in r["policies"].items():
        d, s = v["drift"], v["speed_b1"]
        lines.append(f"| {p} | {v['nodes_fp32']} | {v['casts']} | {v['fp16_weight_fraction']:.2%} | "
                     f"{d['max_abs']:.3g} | {d['mean_abs']:.3g} | {d['top1_agreement']:.1%} ({d['top1_flips']} "
                     f"flips) | {d['top5_overlap']:.3f} | {s['time_ratio_fp16_over_fp32']:.2f} "
                     f"({s['p50_ms']:.0f} vs {s['fp32_p50_ms']:.0f} ms) |")
    lines += ["", f"Timing: batch 1, {r['timing']['repeats']} rounds, {r['timing']['interleaving']}; "
              f"{r['timing']['note']}. Time ratio = 1 / median over rounds of (FP32 time / FP16 time).",
              f"DEFAULT_KEEP_FP32 when measured: {r['default_keep_fp32'] or '() (all FP16)'}.",
              f"Spread across policies: max abs Δlogit {spread[0]:.3g}–{spread[1]:.3g}, top-1 agreement "
              f"{agree[0]:.1%}–{agree[1]:.1%}, time ratio {speed[0]:.2f}–{speed[1]:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
