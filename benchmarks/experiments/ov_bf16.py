"""bf16 for what is not int8, on the trained reference: OpenVINO's inference precision f32 vs bf16 (AMX CPUs).

sedeploy's OpenVINO runner pins ``INFERENCE_PRECISION_HINT`` to f32 for FP32 and INT8 graphs (OpenVINO's default on
AMX / AVX512-BF16 CPUs is bf16, a precision change sedeploy does not make silently). This measures what bf16 would
give, on the artifacts ``benchmarks/reference_int8.py`` leaves in its work folder: the FP32 graph, every layer INT8,
and the accuracy-budget artifacts (float fallback layers would run in bf16). Top-1 agreement with FP32 (f32) on the
1,925 Imagenette val images the budget search never saw (``reference_int8.py``'s split), and speed at batch 8
(static shape, 2 threads, LATENCY), all engines interleaved (:func:`sedeploy.backends.timing.time_runners`, settle 1).

    python benchmarks/reference_int8.py --budget-only --budget 99.3 --budget-images 2000   # leaves the artifacts
    python benchmarks/experiments/ov_bf16.py --budget-artifacts /tmp/sedeploy-reference-int8/budget/*.int8-ov.onnx

Or on any `sedeploy build-engine --int8 --backend openvino` folder (its FP32 graph and int8-ov artifact), with the
first ``--images`` of a flat image folder, all of them scored:

    python benchmarks/experiments/ov_bf16.py --build-folder engines/ --size 224 --images 300 \
        --data ../shared/data/imagenet-val-1300/images --name results-se50-224px
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


class _Compiled:
    """One OpenVINO model compiled at batch 8 with an explicit inference precision (a benchmark-only runner: the
    product's runner never takes bf16 for an FP32/INT8 graph)."""

    def __init__(self, core, path: Path, hint: str, size: int):
        from sedeploy.backends.openvino_support import compile_config

        model = core.read_model(str(path))
        model.reshape({model.inputs[0]: [8, 3, size, size]})
        config = compile_config(threads=2, precision_hint=hint)  # sedeploy's settings; only the hint differs
        self.compiled = core.compile_model(model, "CPU", config)
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if got != hint:
            raise RuntimeError(f"OpenVINO compiled {path.name} with {got}, not {hint}")
        self.request = self.compiled.create_infer_request()

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, copy=True)

    def activate(self):
        return self

    def deactivate(self) -> None:
        pass


def _logits(r, x: np.ndarray) -> np.ndarray:
    from sedeploy.onnxcore import pad_to_batch

    return np.concatenate([r.infer(pad_to_batch(x[i:i + 8], 8))[: len(x[i:i + 8])] for i in range(0, len(x), 8)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-reference-int8")
    ap.add_argument("--budget-artifacts", type=Path, nargs="*", default=[])
    ap.add_argument("--data", type=Path, default=BENCH.parent.parent / "shared" / "data" / "imagenette")
    ap.add_argument("--search-images", type=int, default=2000, help="reference_int8.py's --budget-images")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--build-folder", type=Path, default=None,
                    help="a build-engine folder: its *.fp32.onnx and *.int8-ov.onnx instead of the reference's")
    ap.add_argument("--size", type=int, default=112, help="input size (the reference: 112)")
    ap.add_argument("--images", type=int, default=0, help="with --build-folder: the first N images of --data")
    ap.add_argument("--name", default="results", help="results file name in benchmarks/results/ov_bf16/")
    args = ap.parse_args(argv)

    import openvino as ov

    from common import write_results
    from sedeploy.backends.timing import paired_speedup, time_runners
    from sedeploy.preprocess import Preprocess, find_images, load_batch

    pp = Preprocess.for_size(args.size)
    core = ov.Core()
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in caps:
        sys.exit(f"this CPU has no bf16 for OpenVINO (its capabilities: {', '.join(caps)})")
    if args.build_folder is not None:
        found = find_images(args.data).paths
        x, _ = load_batch(found[:args.images] if args.images else found, pp)
        xh = x
        sources = {"FP32 graph": next(args.build_folder.glob("*.fp32.onnx")),
                   "every layer INT8": next(args.build_folder.glob("*.int8-ov.onnx"))}
        scored = f"the first {len(xh)} images of {args.data}"
    else:
        x, _ = load_batch(find_images(args.data / "val").paths, pp)
        held = np.random.default_rng(0).permutation(len(x))[args.search_images:]
        xh = x[held]
        sources = {"FP32 graph": args.work / "112px" / "engines" / "reference.fp32.onnx",  # reference_int8.prepare
                   "every layer INT8": args.work / "budget" / "all-int8.onnx",
                   **{f"budget artifact {p.name}": p for p in args.budget_artifacts}}
        scored = f"the {len(xh)} held-out Imagenette val images"
    runners = {f"{name}, {hint}": _Compiled(core, path, hint, args.size) for name, path in sources.items()
               for hint in ("f32", "bf16")}
    ref_name = "FP32 graph, f32"
    ref = _logits(runners[ref_name], xh).argmax(1)
    res = {"heldout_images": int(len(xh)), "rows": {}}
    for n, r in runners.items():
        res["rows"][n] = {"agreement_pct": round(100 * float((_logits(r, xh).argmax(1) == ref).mean()), 2)}
    t = time_runners(runners, x[:8], batch_sizes=(8,), warmup=3, repeats=args.repeats, settle=1)
    for n in runners:
        res["rows"][n]["x_fp32_f32"] = round(paired_speedup(t.samples[ref_name][8], t.samples[n][8]), 3)
        res["rows"][n]["img_s"] = round(8 / float(np.median(t.samples[n][8])), 1)
    model = ("trained reference SE-ResNet-50" if args.build_folder is None
             else f"{sources['FP32 graph'].name.removesuffix('.fp32.onnx')} from {args.build_folder}")
    lines = [f"# OpenVINO inference precision f32 vs bf16 — {model}, {args.size} px", "",
             f"Top-1 agreement with FP32 (f32) on {scored}; speed at batch 8, "
             f"interleaved ({args.repeats} rounds, settle 1, 2 threads, static shape).", "",
             "| engine, precision of the non-int8 parts | agreement | img/s | × FP32 f32 |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['agreement_pct']} % | {r['img_s']} | {r['x_fp32_f32']} |" for n, r in res["rows"].items()]
    print("\n".join(lines))
    write_results(__file__, res, "\n".join(lines), argv=argv, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
