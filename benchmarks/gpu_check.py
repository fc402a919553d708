"""The TensorRT path end to end on a GPU machine, in one run (≤ 8 minutes), with a verdict and an exit code.

On a machine with an NVIDIA GPU, a CUDA build of torch and TensorRT 10.x/11.x (``pip install -e '.[tensorrt]'``):

1. writes SE-ResNet-50's artifacts (random weights, seed 0; or ``--checkpoint``): FP32, FP16, INT8 for TensorRT
   (Q/DQ in the FP16 graph, calibrated on ``--calib-images`` real images);
2. builds a strongly typed plan from each (batch profile 1/8/32) and reads every layer's precision from TensorRT's
   engine inspector (through an execution context at the opt batch; 10.x and 11.x JSON layouts);
3. runs ``--images`` real images through each plan and through ONNX Runtime CPU on the same artifact: top-1
   agreement and max |Δlogit|;
4. times the plans interleaved (sedeploy.backends.timing.time_runners) at batch 1, 8 and 32: the timer covers
   ``TrtRunner.infer`` (pinned host staging, H2D, execute_async_v3, D2H, one stream sync).

Then one screen: per engine PASS/FAIL for *built*, *precisions* (FAIL when any layer's precision is unreadable, when
the inspector listed no layers, or when no layer runs in the artifact's own precision — never a vacuous pass),
*agreement* (top-1 agreement with ONNX Runtime ≥ ``--min-agreement-*``, all logits finite) and *latency* (p50 at
batch 1, 8 and 32). Exit code: 0 every engine passed; 3 a check failed; 4 TensorRT or a CUDA GPU is missing
(nothing verified: with a GPU but no TensorRT it still checks the runner's buffer path and, with onnxruntime-gpu,
ONNX Runtime's CUDA provider, and says so).

    PYTHONPATH=. python benchmarks/gpu_check.py            # results: benchmarks/results/gpu_check/<host>.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "imagenet-val-1300"
OUT = HERE / "results" / "gpu_check"


def _images(n: int, offset: int = 0) -> tuple[np.ndarray, str]:
    from sedeploy.preprocess import Preprocess, load_batch, smooth_noise

    if (DATA / "labels.tsv").is_file():
        files = [DATA / "images" / line.split("\t")[0]
                 for line in (DATA / "labels.tsv").read_text().splitlines() if line.strip()]
        x, _ = load_batch(files[offset:offset + n], Preprocess())
        return x, f"{len(x)} real ImageNet-val images ({DATA})"
    return smooth_noise(n, 224, seed=offset), f"{n} smooth-noise images ({DATA} absent)"


def _artifacts(tmp: Path, calib_images: int, checkpoint: str | None) -> dict[str, Path]:
    from sedeploy.quantize import calibrate
    from sedeploy.export import export_onnx
    from sedeploy.fp16 import convert_fp16
    from sedeploy.quantize import quantize_model
    from sedeploy.model import build_model

    model = build_model(50, seed=0)
    if checkpoint:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    fp32 = export_onnx(model.eval(), tmp / "se50.fp32.onnx", input_size=224)
    calib = tmp / "calib"
    calib.mkdir()
    from PIL import Image

    if (DATA / "labels.tsv").is_file():  # link the last images (disjoint from the checked ones)
        files = [DATA / "images" / line.split("\t")[0]
                 for line in (DATA / "labels.tsv").read_text().splitlines() if line.strip()][-calib_images:]
        for f in files:
            os.symlink(f, calib / f.name)
    else:
        for i in range(calib_images):
            Image.fromarray((np.random.default_rng(i).random((224, 224, 3)) * 255).astype(np.uint8)).save(
                calib / f"noise{i}.png")
    cal = calibrate(fp32, calib, progress=False, cache_dir=tmp / "cc")
    paths = {"fp32": fp32, "fp16": tmp / "se50.fp16.onnx", "int8-trt": tmp / "se50.int8-trt.onnx"}
    convert_fp16(fp32, paths["fp16"])
    quantize_model(fp32, cal, paths["int8-trt"], flavour="trt")
    return paths


def _buffer_path_check() -> dict:
    """The runner's buffer mechanics on the GPU without TensorRT: round trip through device buffers."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream(dev)
    x = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    host_in = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
    host_out = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
    dev_buf = torch.empty(x.shape, dtype=torch.float32, device=dev)
    host_in.copy_(torch.from_numpy(x))
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        dev_buf.copy_(host_in, non_blocking=True)
        dev_buf.mul_(2.0)
        host_out.copy_(dev_buf, non_blocking=True)
    stream.synchronize()
    ok = bool(np.array_equal(host_out.numpy(), 2 * x))
    return {"ok": ok, "gpu": torch.cuda.get_device_name(dev), "stream": int(stream.cuda_stream),
            "round_trip_ms_batch32": round(1e3 * (time.perf_counter() - t0), 3)}


def _ort_cuda_check(paths: dict[str, Path], x: np.ndarray) -> dict:
    from sedeploy.backends.ort import OrtRunner
    from sedeploy.onnxcore import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        return {"skipped": f"onnxruntime-gpu not installed (providers: {available_providers()})"}
    out = {}
    for kind in ("fp32", "fp16"):
        with OrtRunner(paths[kind], providers="cpu") as cpu, OrtRunner(paths[kind], providers="cuda") as gpu:
            ref, got = cpu.infer(x), gpu.infer(x)
            out[kind] = {"providers": gpu.providers, "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
                         "max_abs_diff": float(np.abs(ref - got).max())}
    return out


#: Default minimum top-1 agreement of each plan with ONNX Runtime CPU running the same artifact.
MIN_AGREEMENT = {"fp32": 0.98, "fp16": 0.95, "int8-trt": 0.90}
#: The precision each artifact's graph is in (sedeploy.onnxcore.graph_precision names).
GRAPH_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8-trt": "int8"}
BATCHES = (1, 8, 32)
EXIT_OK, EXIT_FAILED, EXIT_MISSING = 0, 3, 4


def engine_verdict(kind: str, check: dict, min_agreement: float) -> tuple[bool, list[str]]:
    """PASS/FAIL lines for one engine from its check record (pure: tested without a GPU)."""
    from sedeploy.backends.trt_support import precision_verdict

    if check.get("error"):
        return False, [f"  built       FAIL  {check['error']}"]
    lines = [f"  built       PASS  in {check['build_seconds']:.1f} s (inspector layout: {check.get('layout')})"]
    ok = True
    problems = precision_verdict({"layers": check.get("layers"), "counts": check.get("layer_precisions"),
                                  "unreadable": check.get("unreadable_layers")}, GRAPH_PRECISION[kind])
    counts = check.get("layer_precisions")
    lines.append(f"  precisions  {'FAIL' if problems else 'PASS'}  {counts}")
    lines += [f"              - {p}" for p in problems]
    ok &= not problems
    if check.get("run_error"):
        lines.append(f"  agreement   FAIL  the plan did not run: {check['run_error']}")
        return False, lines
    agreement, diff = check.get("top1_agreement_vs_ort"), check.get("max_abs_diff_vs_ort")
    good = agreement is not None and diff is not None and math.isfinite(diff) and agreement >= min_agreement
    shown = "not measured" if agreement is None else (f"top-1 {agreement:.2%} (≥ {min_agreement:.0%} needed), "
                                                       f"max |Δlogit| {diff:.4g} on {check.get('images')} images")
    lines.append(f"  agreement   {'PASS' if good else 'FAIL'}  {shown}")
    ok &= good
    latency = check.get("latency_ms_p50") or {}
    missing = [b for b in BATCHES if latency.get(str(b)) is None]
    shown = ", ".join(f"b{b} {latency[str(b)]:.3f} ms" for b in BATCHES if str(b) in latency) or \
        f"not timed{': ' + check['timing_error'] if check.get('timing_error') else ''}"
    lines.append(f"  latency     {'FAIL' if missing else 'PASS'}  p50 {shown}"
                 + (f" (missing batch {', '.join(map(str, missing))})" if missing else ""))
    ok &= not missing
    return bool(ok), lines


def verdict(checks: dict[str, dict], thresholds: dict[str, float]) -> tuple[int, list[str]]:
    """The one-screen verdict and the exit code for every engine's check record."""
    lines, failed = [], []
    for kind in GRAPH_PRECISION:
        if kind not in checks:
            failed.append(kind)
            lines.append(f"{kind}: FAIL (not checked)")
            continue
        ok, detail = engine_verdict(kind, checks[kind], thresholds[kind])
        lines.append(f"{kind}: {'PASS' if ok else 'FAIL'}")
        lines += detail
        if not ok:
            failed.append(kind)
    lines.append(f"VERDICT: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}")
    return (EXIT_FAILED if failed else EXIT_OK), lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256, help="images checked against ONNX Runtime")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--timing-seconds", type=float, default=15.0, help="timing budget per batch size")
    for kind, value in MIN_AGREEMENT.items():
        ap.add_argument(f"--min-agreement-{kind}", type=float, default=value,
                        help=f"minimum top-1 agreement of the {kind} plan with ONNX Runtime (default {value})")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    thresholds = {kind: getattr(args, f"min_agreement_{kind.replace('-', '_')}") for kind in MIN_AGREEMENT}
    t_all = time.perf_counter()
    from sedeploy.backends.tensorrt import trt_version

    try:
        import torch

        gpu = bool(torch.cuda.is_available())
    except ImportError:
        gpu = False
    version = trt_version()
    result: dict = {"command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
                    "host": platform.node(), "tensorrt": ".".join(map(str, version)) if version else None,
                    "cuda_gpu": gpu}
    if version is None and not gpu:
        print("NOT VERIFIED: TensorRT is not installed (`import tensorrt` failed) and no CUDA GPU is visible to "
              "torch: nothing to check on this machine (exit 4).")
        return EXIT_MISSING
    if version is None:
        print("TensorRT is not installed (`import tensorrt` failed): no plans built; running what can run here.")
    elif not gpu:
        print(f"NOT VERIFIED: TensorRT {result['tensorrt']} is installed but no CUDA GPU is visible to torch "
              "(exit 4).")
        return EXIT_MISSING
    out = Path(args.out)
    code = EXIT_MISSING
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        result["buffer_path"] = _buffer_path_check()
        print(f"torch CUDA buffer path (pinned staging, non-blocking copies, one stream): {result['buffer_path']}")
        paths = _artifacts(tmp, args.calib_images, args.checkpoint)
        x, what = _images(args.images)
        result["images"] = what
        result["ort_cuda"] = _ort_cuda_check(paths, x[:64])
        print(f"ONNX Runtime CUDA vs CPU: {result['ort_cuda']}")
        if version is not None:
            result.update(_tensorrt(paths, x, tmp, args.timing_seconds))
            code, lines = verdict(result["checks"], thresholds)
            result["verdict"] = {"exit_code": code, "lines": lines, "min_agreement": thresholds}
            print(f"\n== TensorRT {result['tensorrt']} on {result['buffer_path']['gpu']}, {what} ==")
            print("\n".join(lines))
        else:
            print("NOT VERIFIED: no TensorRT plan was built (exit 4).")
    if not result["buffer_path"]["ok"]:
        code = EXIT_FAILED
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{platform.node() or 'host'}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path} ({result['seconds']} s); exit {code}")
    return code


def _tensorrt(paths: dict[str, Path], x: np.ndarray, tmp: Path, timing_seconds: float) -> dict:
    from sedeploy.backends.tensorrt import TrtRunner, build_trt_engine
    from sedeploy.backends.timing import time_runners
    from sedeploy.errors import SedeployError
    from sedeploy.onnxcore import cpu_session, run_model

    plans, checks = {}, {}
    for kind, src in paths.items():
        try:
            eng = build_trt_engine(src, tmp / "plans", min_batch=1, opt_batch=8, max_batch=32, workspace_gib=4.0,
                                   timing_cache=tmp / "plans" / "timing.cache")
        except SedeployError as err:
            checks[kind] = {"error": str(err).splitlines()[0][:300]}
            print(f"{kind:9s} NOT BUILT: {err}")
            continue
        plans[kind] = eng.path
        meta = eng.metadata
        checks[kind] = {key: meta.get(key) for key in ("layer_precisions", "layers", "unreadable_layers",
                                                       "build_seconds", "tensorrt_cuda")}
        checks[kind]["layout"] = meta.get("inspector_layout")
        print(f"{kind:9s} built in {meta['build_seconds']:5.1f} s; layers by precision (engine inspector, "
              f"{meta.get('inspector_layout')}): {meta['layer_precisions']}; unreadable: "
              f"{len(meta.get('unreadable_layers') or [])}; TensorRT CUDA {meta['tensorrt_cuda']}")
        ref = run_model(cpu_session(src), x)
        try:
            with TrtRunner(eng.path) as runner:
                feed = x.astype(runner.input_dtype)
                got = np.concatenate([runner.infer(feed[i:i + 32])
                                      for i in range(0, len(feed), 32)]).astype(np.float32)
        except SedeployError as err:
            checks[kind]["run_error"] = str(err).splitlines()[0][:300]
            print(f"{kind:9s} FAILED TO RUN: {err}")
            continue
        checks[kind].update({"images": len(x),
                             "top1_agreement_vs_ort": float((ref.argmax(1) == got.argmax(1)).mean()),
                             "max_abs_diff_vs_ort": float(np.abs(ref - got).max())})
    timed = {k: p for k, p in plans.items() if "run_error" not in checks[k]}
    if not timed:
        return {"checks": checks}
    runners = {}
    try:
        runners = {k: TrtRunner(p).activate() for k, p in timed.items()}
        timing = time_runners(runners, x, batch_sizes=BATCHES, warmup=5, repeats=50, min_repeats=10,
                              max_seconds=timing_seconds)
    except SedeployError as err:
        print(f"timing FAILED: {err}")
        for k in timed:
            checks[k]["timing_error"] = str(err).splitlines()[0][:300]
        return {"checks": checks}
    finally:
        for r in runners.values():
            r.deactivate()
    table = {}
    for kind in timed:
        table[kind] = {}
        for b in BATCHES:
            s = timing.stats(kind, b)
            if s:
                table[kind][b] = s
                checks[kind].setdefault("latency_ms_p50", {})[str(b)] = s["latency_ms"]["p50"]
                print(f"{kind:9s} batch {b:2d}: p50 {s['latency_ms']['p50']:.3f} ms, {s['throughput']:.0f} img/s "
                      f"(IQR {s['iqr_pct']:.1f} %, n={s['n']})")
    return {"checks": checks, "timing": timing.as_dict(), "timing_table": table}


if __name__ == "__main__":
    raise SystemExit(main())
