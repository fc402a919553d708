"""Measure the FP16 artifact's keep-FP32 policies on SE-ResNet-50: logit drift and top-1 agreement with FP32.

For each policy (nothing kept, the SE gate, the whole SE branch, the head, and two combinations) the FP32 export
is converted with :func:`sedeploy.fp16.convert_fp16`, then its drift from the FP32 logits is measured on the first
``--images`` real images of ``--data`` (max / mean / p99 |Δlogit|, top-1 agreement, top-5 overlap), with the
FP32 logits' top-1 margin beside it (on random weights a small margin makes top-1 flips cheap).

The FP16 graph is run through :func:`sedeploy.fp16_verify.fp16_emulation` (every float16 tensor rounded where the graph
stores it): ONNX Runtime's CPU provider would compute the FP16 file itself in FP32 with FP16-rounded weights only.
That weights-only drift is recorded too, for the "none" policy, to show what the emulation adds. No speed is
measured: no CPU here computes FP16 (ONNX Runtime runs the FP16 graph in FP32; OpenVINO needs FP16 arithmetic).

This is what :data:`sedeploy.fp16.DEFAULT_KEEP_FP32` is chosen from. Random weights (``build_model(50)``)
unless ``--checkpoint`` points at trained ones. Results: ``benchmarks/results/fp16_policy/results.json`` and ``.md``.

    python benchmarks/experiments/fp16_policy.py --images 300        # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH))  # benchmarks/common.py
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


def _logits(model, x: np.ndarray, threads: int, batch: int = 16, optimization: str = "all") -> np.ndarray:
    from sedeploy.onnxcore import cpu_session, run_model

    sess = cpu_session(model, threads=threads, optimization=optimization)
    return np.concatenate([run_model(sess, x[i:i + batch]) for i in range(0, len(x), batch)])


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
    ap.add_argument("--data", default=str(BENCH.parent.parent / "shared/data/imagenet-val-1300/images"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="trained SE-ResNet-50 state_dict (default: random weights)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from sedeploy.fp16 import DEFAULT_KEEP_FP32, convert_fp16
    from sedeploy.fp16_verify import fp16_emulation
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
        got = _logits(fp16_emulation(out), x, args.threads, optimization="basic")
        results["policies"][policy] = {
            "path": str(out), "drift": _drift(ref, got), "nodes_fp16": rep.nodes_fp16, "nodes_fp32": rep.nodes_fp32,
            "casts": rep.casts, "fp16_weight_fraction": rep.fp16_weight_fraction,
            "kept_fp32_nodes": {k: len(v) for k, v in rep.kept_fp32_nodes.items()}}
        if policy == "none":
            results["weights_only_none"] = _drift(ref, _logits(out, x, args.threads))
        print(policy, json.dumps(results["policies"][policy]["drift"]), flush=True)
    results.update({
        "model": "SE-ResNet-50 " + (f"weights {args.checkpoint}" if args.checkpoint else "random weights (seed 0)"),
        "input_size": 224, "images": len(x), "data": args.data, "threads": args.threads,
        "fp32_top1_margin": {"median": float(np.median(margin)), "min": float(margin.min())},
        "fp32_logit_std": float(ref.std()), "fp32_distinct_top1": int(len(set(ref.argmax(1)))),
        "default_keep_fp32": list(DEFAULT_KEEP_FP32), "onnxruntime": ort.__version__,
        "python": platform.python_version(), "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/experiments/fp16_policy.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    from common import write_results  # noqa: E402  (benchmarks/common.py)

    print("wrote", write_results(__file__, results, _markdown(results), argv=argv))
    print(_markdown(results))
    return 0


def _markdown(r: dict) -> str:
    lines = [
        "# FP16 artifact: keep-FP32 policies on SE-ResNet-50", "",
        f"Command: `{r['command'].strip()}` (ONNX Runtime {r['onnxruntime']}, CPU, {r['threads']} threads). "
        f"Model: {r['model']}, {r['input_size']} px; drift on {r['images']} real images ({r['data']}). FP32 "
        f"logits: std {r['fp32_logit_std']:.3g}, {r['fp32_distinct_top1']} distinct top-1 classes, top-1 margin "
        f"median {r['fp32_top1_margin']['median']:.3g} / min {r['fp32_top1_margin']['min']:.3g}.", "",
        "Every FP16 graph runs through `sedeploy.fp16_verify.fp16_emulation`: each float16 tensor is rounded where the "
        "graph stores it (ONNX Runtime's CPU provider would compute the FP16 file in FP32, rounding the weights "
        "only; that figure is the last row). No speed is measured: no CPU here computes FP16.", "",
        "| keep FP32 | FP32 nodes | Casts | FP16 weights | max abs Δlogit | mean abs Δlogit | top-1 agreement "
        "| top-5 overlap |",
        "|---|---|---|---|---|---|---|---|"]
    pol = r["policies"].values()
    spread = (min(v["drift"]["max_abs"] for v in pol), max(v["drift"]["max_abs"] for v in pol))
    agree = (min(v["drift"]["top1_agreement"] for v in pol), max(v["drift"]["top1_agreement"] for v in pol))

    def row(name, v, d):
        nodes = f"{v['nodes_fp32']} | {v['casts']} | {v['fp16_weight_fraction']:.2%}" if v else "– | – | 100.00%"
        return (f"| {name} | {nodes} | {d['max_abs']:.3g} | {d['mean_abs']:.3g} | {d['top1_agreement']:.1%} "
                f"({d['top1_flips']} flips) | {d['top5_overlap']:.3f} |")

    for p, v in r["policies"].items():
        lines.append(row(p, v, v["drift"]))
    lines.append(row("none, weights rounded only (the FP16 file on ORT's CPU provider)", None, r["weights_only_none"]))
    lines += ["", f"DEFAULT_KEEP_FP32 when measured: {r['default_keep_fp32'] or '() (all FP16)'}.",
              f"Spread across policies (emulated): max abs Δlogit {spread[0]:.3g}–{spread[1]:.3g}, top-1 agreement "
              f"{agree[0]:.1%}–{agree[1]:.1%}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
