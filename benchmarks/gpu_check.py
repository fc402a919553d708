"""The TensorRT path end to end on a GPU machine, in one run (≤ 8 minutes): what cannot be proven without one.

On a machine with an NVIDIA GPU, a CUDA build of torch and TensorRT 10.x/11.x (``pip install -e '.[tensorrt]'``):

1. writes SE-ResNet-50's artifacts (random weights, seed 0; or ``--checkpoint``): FP32, FP16, INT8 for TensorRT
   (Q/DQ in the FP16 graph, calibrated on ``--calib-images`` real images);
2. builds a strongly typed plan from each (batch profile 1/8/32) and prints the per-layer precision counts that
   TensorRT's engine inspector reports (the proof that FP16 is FP16 and INT8 is INT8 on *this* TensorRT);
3. runs ``--images`` real images through each plan and through ONNX Runtime CPU on the same artifact: top-1
   agreement and max |Δlogit|;
4. times the three plans interleaved (sedeploy.bench.timing.time_runners) at batch 1, 8 and 32: the timer covers
   ``TrtRunner.infer`` (pinned host staging, H2D, execute_async_v3, D2H, one stream sync).

Without TensorRT it says so in one line and still runs what it can: with a CUDA GPU, the runner's buffer path
(device buffers + pinned host staging + non-blocking copies on one torch stream, round-tripped and compared) and,
when onnxruntime-gpu is installed, ONNX Runtime's CUDA provider against its CPU provider on the FP32 and FP16
artifacts; without a GPU it says that and exits 0.

    PYTHONPATH=. python benchmarks/gpu_check.py            # results: benchmarks/results/gpu_check/<host>.json
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
    from sedeploy.calibration import calibrate
    from sedeploy.export import export_onnx
    from sedeploy.fp16 import convert_fp16
    from sedeploy.int8 import quantize_model
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256, help="images checked against ONNX Runtime")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--timing-seconds", type=float, default=20.0, help="timing budget per batch size")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
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
        print("TensorRT is not installed (`import tensorrt` failed) and no CUDA GPU is visible to torch: nothing "
              "to check on this machine.")
        return 0
    if version is None:
        print("TensorRT is not installed (`import tensorrt` failed): no plans built; running what can run here.")
    elif not gpu:
        print(f"TensorRT {result['tensorrt']} is installed but no CUDA GPU is visible to torch: nothing to run.")
        return 0
    out = Path(args.out)
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
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{platform.node() or 'host'}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path} ({result['seconds']} s)")
    return 0


def _tensorrt(paths: dict[str, Path], x: np.ndarray, tmp: Path, timing_seconds: float) -> dict:
    from sedeploy.backends.tensorrt import TrtRunner, build_trt_engine
    from sedeploy.bench.timing import time_runners
    from sedeploy.onnxcore import cpu_session, run_model

    plans, checks = {}, {}
    for kind, src in paths.items():
        t0 = time.perf_counter()
        eng = build_trt_engine(src, tmp / "plans", min_batch=1, opt_batch=8, max_batch=32, workspace_gib=4.0,
                               timing_cache=tmp / "plans" / "timing.cache")
        plans[kind] = eng.path
        counts = eng.metadata["layer_precisions"]
        print(f"{kind:9s} built in {time.perf_counter() - t0:5.1f} s; layers by precision (engine inspector): "
              f"{counts}; TensorRT CUDA {eng.metadata['tensorrt_cuda']}")
        ref = run_model(cpu_session(src), x)
        with TrtRunner(eng.path) as runner:
            feed = x.astype(runner.input_dtype)
            got = np.concatenate([runner.infer(feed[i:i + 32]) for i in range(0, len(feed), 32)]).astype(np.float32)
        checks[kind] = {"layer_precisions": counts,
                        "top1_agreement_vs_ort": float((ref.argmax(1) == got.argmax(1)).mean()),
                        "max_abs_diff_vs_ort": float(np.abs(ref - got).max()),
                        "build_seconds": eng.metadata["build_seconds"]}
        print(f"{kind:9s} vs ONNX Runtime CPU on the same artifact: top-1 agreement "
              f"{checks[kind]['top1_agreement_vs_ort']:.2%}, max |Δlogit| {checks[kind]['max_abs_diff_vs_ort']:.4f}")
    runners = {k: TrtRunner(p).activate() for k, p in plans.items()}
    try:
        timing = time_runners(runners, x, batch_sizes=(1, 8, 32), warmup=5, repeats=50, min_repeats=10,
                              max_seconds=timing_seconds)
    finally:
        for r in runners.values():
            r.deactivate()
    table = {}
    for kind in plans:
        table[kind] = {}
        for b in (1, 8, 32):
            s = timing.stats(kind, b)
            if s:
                table[kind][b] = s
                lat = s["latency_ms"]
                print(f"{kind:9s} batch {b:2d}: p50 {lat['p50']:.3f} ms, {s['throughput']:.0f} img/s "
                      f"(IQR {s['iqr_pct']:.1f} %, n={s['n']})")
    return {"checks": checks, "timing": timing.as_dict(), "timing_table": table}


if __name__ == "__main__":
    raise SystemExit(main())
