"""INT8 forms on real third-party ImageNet classifiers: sedeploy's FP16 / int8-ov / int8-cpu / int8-trt against NNCF.

For each ImageNet model of ../shared/data/models (its README gives the preprocessing), one seeded draw of
``--calib-count`` images from imagenet-val-1300 calibrates every form, and agreement with FP32 (top-1) and the
top-1 drop are measured on the remaining images. Forms, all built with sedeploy's library (not the CLI):

The FP32 model is first put in canonical form (:func:`sedeploy.passes.canonical.canonicalize`, what
build-engine does before anything else); every form and the FP32 reference use that graph.

- ``fp16``: :func:`sedeploy.fp16.to_fp16` (the FP16 artifact's default policy), run by ONNX Runtime CPU;
- ``int8-ov``: :func:`sedeploy.quantize.quantize_model` flavour ``ov``, run by OpenVINO (CPU plugin);
- ``int8-cpu``: flavour ``cpu`` (QOperator), run by ONNX Runtime CPU;
- ``int8-trt``: flavour ``trt`` (Q/DQ inside the FP16 graph), run by ONNX Runtime CPU (no TensorRT here; ORT
  executes that graph);
- ``nncf``: ``nncf.quantize`` with its default preset on the same calibration images, run by OpenVINO.

``--ov-isa AVX2`` caps OpenVINO's kernels at AVX2 (``ONEDNN_MAX_CPU_ISA``, set before OpenVINO loads), i.e. what a
CPU without VNNI runs (int8 products summed in int16); it changes only the OpenVINO-run forms and is recorded.
``--ablations`` adds int8-ov variants (8-bit weights, no bias correction, Clip left out of the quantized ops).
A form that fails to build is reported with its error, and the other forms still run.

    python benchmarks/zoo_int8.py                   # every ImageNet zoo model, results/zoo_int8/results.{json,md}
    python benchmarks/zoo_int8.py --ov-isa AVX2 --name results-avx2
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import SHARED_DATA, write_results  # noqa: E402

#: the ImageNet models of ../shared/data/models and their preprocessing (models/README.md): mean/std on 0–255
#: RGB pixels, resize of the short side to 256 then centre crop 224; ``offset``: class index of ImageNet class 0
ZOO = {
    "mobilenet_v1_0.25_224_tf2onnx_nchw.onnx": {"name": "MobileNet-V1 0.25 (tf2onnx, NCHW)", "mean": (127.5,) * 3,
                                                 "std": (127.5,) * 3, "offset": 1},
    "squeezenet1.1_gluon_webnn.onnx": {"name": "SqueezeNet 1.1", "mean": (123.675, 116.28, 103.53),
                                       "std": (58.395, 57.12, 57.375), "offset": 0},
    "efficientnet_lite0_torch_legacy.onnx": {"name": "EfficientNet-Lite0", "mean": (127.0,) * 3,
                                             "std": (128.0,) * 3, "offset": 0},
}
FORMS = ("fp16", "int8-ov", "int8-cpu", "int8-trt", "nncf")
ABLATIONS = ("int8-ov 8-bit weights", "int8-ov 7-bit all", "int8-ov 7-bit dense inputs", "int8-ov no bias correction", "int8-ov Clip float")


def _labels(folder: Path) -> dict[str, int]:
    rows = (line.split("\t") for line in (folder / "labels.tsv").read_text(encoding="utf-8").splitlines() if line)
    return {name: int(cls) for name, cls in rows}


def _ov_logits(source, x: np.ndarray) -> np.ndarray:
    from sedeploy.backends.openvino import OpenVinoModelRunner

    runner = OpenVinoModelRunner(source, precision="int8", threads=1)
    runner.activate()
    try:
        batch = 1 if None not in runner.input_shape else 16
        return np.concatenate([runner.infer(x[i:i + batch]) for i in range(0, len(x), batch)])
    finally:
        runner.deactivate()


def _ort_logits(source, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    """ONNX Runtime CPU outputs in chunks (a dynamic-batch model fed every image at once needs gigabytes)."""
    from sedeploy.onnxcore import cpu_session, run_model

    sess = cpu_session(source)
    return np.concatenate([run_model(sess, x[i:i + chunk]) for i in range(0, len(x), chunk)])


def _build(form: str, fp32: Path, cal, work: Path, calib_x: np.ndarray):
    """(what runs it, source for the runner) of one form."""
    from sedeploy import quantize

    out = work / f"{form.replace(' ', '_')}.onnx"
    if form == "fp16":
        from sedeploy.fp16 import to_fp16
        from sedeploy.onnxcore import load_onnx, save_onnx

        save_onnx(to_fp16(load_onnx(fp32))[0], out)
        return "ort", out
    if form == "nncf":
        import nncf
        import openvino as ov

        model = ov.Core().read_model(str(fp32))
        data = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))])
        return "ov", nncf.quantize(model, data, subset_size=len(calib_x))
    kw: dict = {}
    if form == "int8-ov 8-bit weights":
        kw["cpu_options"] = dataclasses.replace(quantize.OV_OPTIONS, reduce_range="none")
    elif form == "int8-ov 7-bit all":
        kw["cpu_options"] = dataclasses.replace(quantize.OV_OPTIONS, reduce_range="all")
    elif form == "int8-ov 7-bit dense inputs":
        kw["cpu_options"] = dataclasses.replace(quantize.OV_OPTIONS, reduce_range="dense-inputs")
    elif form == "int8-ov no bias correction":
        kw["bias_correction"] = False
    elif form == "int8-ov Clip float":
        kw["cpu_options"] = dataclasses.replace(quantize.OV_OPTIONS, extra_ops=tuple(
            o for o in quantize.OV_OPTIONS.extra_ops if o != "Clip"))
    flavour = form.split()[0].removeprefix("int8-")
    quantize.quantize_model(fp32, cal, out, flavour=flavour, **kw)
    return ("ov" if flavour == "ov" else "ort"), out


def run_model_forms(fp32: Path, spec: dict, args, work: Path) -> dict:
    from sedeploy.quantize import calibrate
    from sedeploy.errors import SedeployError
    from sedeploy.metrics import as_logits, metrics
    from sedeploy.onnxcore import load_onnx, output_kind
    from sedeploy.preprocess import Preprocess, find_images, load_batch

    from sedeploy.passes.canonical import canonicalize
    from sedeploy.onnxcore import save_onnx

    # what build-engine does first: the input graph in canonical form (unfolded shape chains folded …)
    canonical, report = canonicalize(load_onnx(fp32, check=False), label=fp32.name)
    if report.changed:
        fp32 = save_onnx(canonical, work / fp32.name)
    pp = Preprocess(size=224, resize_short=256, mean=spec["mean"], std=spec["std"])
    root = args.images / "images"
    paths = find_images(root).paths
    labels = _labels(args.images)
    t0 = time.perf_counter()
    cal = calibrate(fp32, root, count=args.calib_count, seed=args.seed, preprocess=pp, cache_dir=work / "calib",
                    progress=False)
    chosen = set(cal.images)
    evals = [p for p in paths if p.relative_to(root).as_posix() not in chosen][:args.limit]
    x, loaded = load_batch(evals, pp)
    y = np.array([labels[p.name] + spec["offset"] for p in loaded])
    calib_x, _ = load_batch([root / r for r in cal.images], pp)
    kind = output_kind(load_onnx(fp32, check=False))
    ref = as_logits(_ort_logits(fp32, x), kind)
    res = {"model": spec["name"], "file": fp32.name, "canonicalised": bool(report.changed), "calibration": {"images": len(cal.images), "seed": args.seed,
                                                                      "method": cal.method},
           "eval_images": len(x), "output_kind": kind, "top1_fp32_pct": round(float((ref.argmax(1) == y).mean()) * 100, 2),
           "forms": {}}
    for form in args.forms:
        t = time.perf_counter()
        try:
            runner, src = _build(form, fp32, cal, work, calib_x)
            got = _ov_logits(src, x) if runner == "ov" else _ort_logits(src, x)
        except (SedeployError, RuntimeError, ValueError) as err:  # one failing form must not hide the others
            res["forms"][form] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            print(f"  {form}: FAILED {res['forms'][form]['error']}", flush=True)
            continue
        m = metrics(ref, as_logits(got, kind), y)
        res["forms"][form] = {"runtime": "OpenVINO" if runner == "ov" else "ONNX Runtime CPU", **m,
                              "seconds": round(time.perf_counter() - t, 1)}
        print(f"  {form}: agreement {m['agreement_pct']:.2f} %, top-1 drop {m['top1_drop_pts']:+.2f} pt", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def to_markdown(data: dict) -> str:
    isa = data["ov_isa"] or "native (no cap)"
    lines = [f"# INT8 forms on third-party ImageNet models (OpenVINO ISA: {isa})", "",
             f"{data['calib_count']} calibration images (seed {data['seed']}) drawn from imagenet-val-1300. Each cell: "
             "top-1 agreement with FP32 on the remaining images (top-1 change against FP32 in points, from the "
             "labels; negative = lost). int8-trt is run by ONNX Runtime CPU (no TensorRT here). OpenVINO ISA "
             "AVX2: ONEDNN_MAX_CPU_ISA=AVX2, the kernels of a CPU without VNNI (int8 products summed in int16).", "",
             "| model | images | FP32 top-1 | " + " | ".join(data["forms"]) + " |",
             "|---|---|---|" + "---|" * len(data["forms"])]
    for r in data["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | – | – | " + " | ".join(["not built: " + r["error"][:80]] +
                                                                  ["–"] * (len(data["forms"]) - 1)) + " |")
            continue
        cells = []
        for f in data["forms"]:
            m = r.get("forms", {}).get(f, {})
            cells.append(f"failed: {m['error'][:60]}" if "error" in m else
                         f"{m['agreement_pct']:.2f} % ({-m['top1_drop_pts']:+.2f} pt)" if m else "–")
        model = r["model"] + (" (FP32 from " + Path(r["fp32_override"]).name + ")" if r.get("fp32_override") else "")
        lines.append(f"| {model} | {r.get('eval_images', '–')} | {r.get('top1_fp32_pct', '–')} % | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=SHARED_DATA / "models", help="folder of the zoo models")
    ap.add_argument("--only", nargs="*", default=None, help="model file names (default: every ImageNet model)")
    ap.add_argument("--images", type=Path, default=SHARED_DATA / "imagenet-val-1300",
                    help="imagenet-val-1300 (images/ and labels.tsv)")
    ap.add_argument("--fp32", action="append", default=[], metavar="NAME=PATH",
                    help="use PATH as the FP32 model of zoo model NAME (e.g. a canonicalised copy); recorded")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many evaluation images")
    ap.add_argument("--forms", nargs="*", default=list(FORMS), choices=[*FORMS, *ABLATIONS])
    ap.add_argument("--ablations", action="store_true", help="also the int8-ov variants " + ", ".join(ABLATIONS))
    ap.add_argument("--ov-isa", default=None, help="cap OpenVINO's kernels, e.g. AVX2 (ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-zoo-int8")
    ap.add_argument("--name", default="results", help="results file name (without suffix)")
    args = ap.parse_args(argv)
    if args.ov_isa:
        if "openvino" in sys.modules:
            ap.error("--ov-isa must be set before OpenVINO loads")
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.ov_isa
    if args.ablations:
        args.forms = list(dict.fromkeys([*args.forms, *ABLATIONS]))
    missing = [p for p in (args.models, args.images) if not p.is_dir()]
    if missing:
        print(f"zoo_int8: {', '.join(map(str, missing))} not found (../shared/data is needed)", file=sys.stderr)
        return 2
    names = args.only or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"not ImageNet zoo models: {unknown} (known: {', '.join(ZOO)})")
    from sedeploy.errors import SedeployError

    if any("=" not in item for item in args.fp32):
        ap.error("--fp32 takes NAME=PATH")
    override = dict(item.split("=", 1) for item in args.fp32)
    if set(override) - set(ZOO):
        ap.error(f"--fp32 names {sorted(set(override) - set(ZOO))}, not zoo models (known: {', '.join(ZOO)})")
    results = []
    for name in names:
        print(f"{ZOO[name]['name']} ({name})", flush=True)
        work = args.work / name.removesuffix(".onnx")
        work.mkdir(parents=True, exist_ok=True)
        try:
            fp32 = Path(override[name]) if name in override else args.models / name
            results.append({**run_model_forms(fp32, ZOO[name], args, work),
                            "fp32_override": str(fp32) if name in override else None})
        except SedeployError as err:  # e.g. a model sedeploy cannot calibrate yet: said, and the others still run
            print(f"  FAILED: {err.what}", flush=True)
            results.append({"model": ZOO[name]["name"], "file": name, "error": err.what})
    data = {"ov_isa": args.ov_isa, "calib_count": args.calib_count, "seed": args.seed, "forms": args.forms,
            "models": results}
    out = write_results(__file__, data, to_markdown(data), argv=sys.argv[1:] if argv is None else argv,
                        name=args.name)
    print(f"wrote {out}/{args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
