"""INT8 on the trained reference SE-ResNet-50: agreement with FP32 per flavour and calibration lever, the accuracy
budget, and the speed against FP32 on the runtime each flavour is for.

The target: ≥ 99.0 % top-1 agreement with FP32 at ≥ 1.8× FP32 (batch 8, CPU INT8). The reference is the
checkpoint ``benchmarks/train_reference.py`` writes (10 Imagenette classes, trained and evaluated at 112 px:
resize short side 128, centre crop 112). Steps, each what a user would run:

1. ``sedeploy export --checkpoint REF --input-size 112`` and ``sedeploy build-engine … --backend none`` (the
   SE-fused FP32 graph);
2. one calibration per range estimator (``--calib-count`` images of Imagenette *train*, seed 0);
3. INT8 artifacts for the ``cpu`` (ONNX Runtime QOperator) and ``ov`` (OpenVINO Q/DQ) flavours with each lever
   (range estimator, bias correction, SE placement), and top-1 agreement with FP32 on Imagenette *val* (3,925
   images, never calibrated on), run by the runtime each flavour is for;
4. the accuracy budget (:func:`sedeploy.int8_budget.quantize_to_budget`, ``--min-agreement``) searched on the first
   ``--budget-images`` val images and then measured on the *other* val images (the figure that counts);
5. speed at batch 8, interleaved per runtime: ORT FP32 vs ``int8-cpu``; OpenVINO FP32 vs ``int8-ov`` (all-INT8
   and budgeted).

    python benchmarks/train_reference.py        # once: ~46 min on 2 cores → ~/.cache/sedeploy/reference/
    python benchmarks/reference_int8.py
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

DATA = HERE.parent.parent / "shared" / "data" / "imagenette"
REF = Path.home() / ".cache" / "sedeploy" / "reference" / "se-resnet50-imagenette.pth"


def smooth(fp32: Path, images: np.ndarray, out: Path, alpha: float = 0.5) -> tuple[Path, int]:
    """Activation–weight rebalancing (SmoothQuant-style) of every Conv A → Relu → Conv B chain whose tensors have no
    other reader: channel c of the ReLU output is divided by s_c = max|X_c|^α / max|W_B[:, c]|^(1-α) (A's weights
    and bias scaled by 1/s_c; ReLU commutes with a positive scale) and B's input channel c multiplied by s_c. The
    FP32 function is unchanged; per-tensor activation ranges become flatter across channels. Returns (path, pairs)."""
    import onnx
    from onnx import numpy_helper

    from sedeploy.onnxcore import Graph, cpu_session, load_onnx, run_model, save_onnx

    model = load_onnx(fp32)
    g = Graph(model)
    pairs = []
    for relu in g.nodes:
        if relu.op_type != "Relu":
            continue
        a = g.made_by(relu.input[0], "Conv")
        readers = g.consumers.get(relu.output[0], [])
        if a is None or len(g.consumers.get(a.output[0], [])) != 1 or len(readers) != 1:
            continue
        b = readers[0]
        if (b.op_type != "Conv" or b.input[0] != relu.output[0] or len(a.input) < 3
                or any(at.name == "group" and at.i != 1 for n in (a, b) for at in n.attribute)):
            continue
        pairs.append((a, relu, b))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for _, relu, _ in pairs:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(relu.output[0]))
    sess = cpu_session(probe)
    names = [relu.output[0] for _, relu, _ in pairs]
    amax = {n: 0.0 for n in names}
    for i in range(0, len(images), 32):
        outs = sess.run(names, {sess.get_inputs()[0].name: images[i:i + 32]})
        for n, o in zip(names, outs):
            amax[n] = np.maximum(amax[n], np.abs(o).max(axis=(0, 2, 3)))
    inits = {t.name: t for t in model.graph.initializer}

    def arr(name):
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def put(name, value):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for a, relu, b in pairs:
        wa, ba, wb = arr(a.input[1]), arr(a.input[2]), arr(b.input[1])
        x_max = np.maximum(amax[relu.output[0]], 1e-5)
        w_max = np.maximum(np.abs(wb).max(axis=(0, 2, 3)), 1e-5)
        s = x_max ** alpha / w_max ** (1 - alpha)
        s = s / np.exp(np.log(s).mean())  # geometric mean 1: only the balance across channels changes
        put(a.input[1], wa / s[:, None, None, None])
        put(a.input[2], ba / s)
        put(b.input[1], wb * s[None, :, None, None])
    x = images[:8]
    ref, got = run_model(fp32, x), run_model(model, x)
    if not np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"rebalancing changed the FP32 logits by {np.abs(got - ref).max()}")
    return save_onnx(model, out), len(pairs)


def prepare(checkpoint: Path, size: int, data: Path, work: Path):
    """(SE-fused FP32 ONNX, preprocessing, val images, val labels): the checkpoint exported and built as a user
    would (``sedeploy export`` then ``build-engine --backend none``), once per ``work`` folder and input size (in
    ``work/<size>px/``)."""
    from sedeploy.preprocess import Preprocess, find_images, load_batch

    work = work / f"{size}px"
    work.mkdir(parents=True, exist_ok=True)
    pp = Preprocess.for_size(size)
    raw, fp32 = work / "reference.onnx", work / "engines" / "reference.fp32.onnx"
    if not raw.is_file():
        subprocess.run([sys.executable, "-m", "sedeploy", "export", "--checkpoint", str(checkpoint),
                        "--input-size", str(size), "-o", str(raw)], check=True)
    if not fp32.is_file():
        subprocess.run([sys.executable, "-m", "sedeploy", "build-engine", str(raw), "--backend", "none",
                        "--resize", str(pp.resize_short), "-o", str(work / "engines")], check=True)
    val = find_images(data / "val", what="Imagenette val")
    x, _ = load_batch(val.paths, pp)
    classes = sorted(set(val.classes))
    return fp32, pp, x, np.array([classes.index(c) for c in val.classes])


def make_runner(path: Path, flavour: str, precision: str):
    if flavour == "ov":
        from sedeploy.backends.openvino import OpenVinoModelRunner

        return OpenVinoModelRunner(path, precision=precision, threads=2)
    from sedeploy.backends.ort import OrtRunner

    return OrtRunner(path, threads=2)


def run_logits(path: Path, flavour: str, precision: str, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    with make_runner(path, flavour, precision) as r:
        return np.concatenate([r.infer(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def pct(mask) -> float:
    return round(100 * float(np.mean(mask)), 2)


def budget_only(args, fp32: Path, x, y, ref, pp, work: Path) -> int:
    """The accuracy budget on the OpenVINO flavour: searched on ``--budget-images`` val images, checked on the rest."""
    from common import write_results
    from sedeploy.quantize import calibrate
    from sedeploy.quantize import quantize_model
    from sedeploy.int8_budget import Budget, quantize_to_budget

    cal = calibrate(fp32, args.data / "train", method=args.method, count=args.calib_count, preprocess=pp,
                    progress=False, cache_dir=work / "cache")
    order = np.random.default_rng(0).permutation(len(x))
    search, held = order[: args.budget_images], order[args.budget_images:]
    art = work / "budget" / "reference.int8-ov.onnx"
    art.parent.mkdir(exist_ok=True)
    _, rep = quantize_to_budget(fp32, cal, art, flavour="ov", images=x[search], labels=y[search],
                                budget=Budget(min_agreement=args.budget, confidence=args.confidence), threads=2,
                                order=args.order,
                                **({} if args.sensitivity_images is None else
                                   {"sensitivity_images": args.sensitivity_images}))
    got = run_logits(art, "ov", "int8", x[held])
    every = work / "budget" / "all-int8.onnx"  # the same calibration, every layer INT8: the held-out baseline
    quantize_model(fp32, cal, every, flavour="ov")
    got_all = run_logits(every, "ov", "int8", x[held])
    b = rep.as_dict()
    from sedeploy.onnxcore import sha256_file

    res = {"model": "trained reference SE-ResNet-50, 112 px", "checkpoint_sha256": sha256_file(args.checkpoint),
           "fp32_val_top1_pct": pct(ref.argmax(1) == y), "method": args.method, "budget_pct": args.budget,
           "confidence": args.confidence, "order": args.order, "sensitivity_images": args.sensitivity_images, "strategy": rep.strategy, "search_images": int(len(search)), "heldout_images": int(len(held)),
           "fell_back": b["fell_back"], "search_all_int8": b["all_int8"], "search_result": b["result"],
           "search_steps": b["search"], "sensitivity": b["sensitivity"], "speed": b["speed"], "seconds": b["seconds"],
           "heldout_all_int8": {"agreement_pct": pct(got_all.argmax(1) == ref[held].argmax(1)),
                                "top1_pct": pct(got_all.argmax(1) == y[held])},
           "heldout": {"agreement_pct": pct(got.argmax(1) == ref[held].argmax(1)),
                       "top1_pct": pct(got.argmax(1) == y[held]), "fp32_top1_pct": pct(ref[held].argmax(1) == y[held])}}
    s, h = res["speed"], res["heldout"]
    steps = ", ".join(f"k={t['k']} {t['agreement_pct']} %" for t in res["search_steps"])
    conf = ("" if args.confidence is None else f" --budget-confidence {args.confidence:g}") + \
        f" --fallback-order {args.order}"
    md = (f"# INT8 budget on the trained reference SE-ResNet-50 (OpenVINO flavour, {args.method} ranges)\n\n"
          f"`--min-agreement {args.budget}{conf}` searched on {len(search)} Imagenette val images (seeded permutation), "
          f"then measured on the other {len(held)} val images, which the search never saw.\n\n"
          f"- fell back to float: {len(res['fell_back'])} layer(s): {', '.join(res['fell_back'])}\n"
          f"- search set: all-INT8 {res['search_all_int8']['agreement_pct']} % → {res['search_result']['agreement_pct']} %"
          f" (95 % lower bound {res['search_result']['agreement_lcb_pct']} %)"
          f" (steps tried: {steps})\n"
          f"- **held-out: {h['agreement_pct']} % agreement**, top-1 {h['top1_pct']} % (FP32 {h['fp32_top1_pct']} %); "
          f"every layer INT8 on the same images: {res['heldout_all_int8']['agreement_pct']} %, top-1 "
          f"{res['heldout_all_int8']['top1_pct']} %\n"
          f"- speed at batch {s['batch']} on {s['backend']}, interleaved: budgeted INT8 **{s['speedup_vs_fp32']['int8_budget']}× "
          f"FP32**, all-INT8 {s['speedup_vs_fp32']['int8_all']}× ({s['repeats']} rounds)\n")
    print(md)
    write_results(__file__, res, md, argv=argv_of(args), name=f"budget-{args.budget:g}-{len(search)}"
                  + ("" if args.confidence is None else f"-c{args.confidence:g}") + f"-{args.order}"
                  + ("" if args.sensitivity_images is None else f"-s{args.sensitivity_images}"))
    return 0


def add_reference_args(ap: argparse.ArgumentParser, *, repeats: int) -> None:
    """The options every trained-reference benchmark takes (checkpoint, data, size, calibration count, rounds,
    work folder)."""
    ap.add_argument("--checkpoint", type=Path, default=REF)
    ap.add_argument("--data", type=Path, default=DATA, help="Imagenette root (train/ for calibration, val/ to test)")
    ap.add_argument("--size", type=int, default=112, help="input size (the reference is trained at 112 px)")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=repeats, help="interleaved timing rounds per batch size")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-reference-int8")


def reference_missing(args) -> bool:
    """True (after saying how to make it) when the reference checkpoint is not there."""
    if args.checkpoint.is_file():
        return False
    print(f"no reference checkpoint at {args.checkpoint}: run benchmarks/train_reference.py first")
    return True


def argv_of(args) -> list[str] | None:
    return sys.argv[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reference_args(ap, repeats=15)
    ap.add_argument("--budget", type=float, default=99.0, help="--min-agreement for the budget search (%%)")
    ap.add_argument("--budget-images", type=int, default=800, help="val images the budget search sees")
    ap.add_argument("--budget-only", action="store_true",
                    help="only the budget search (the estimator from --method), its held-out check and its speed; "
                         "written as budget-<PCT>-<N>.json/md beside the main results")
    ap.add_argument("--method", default="mse", help="range estimator for --budget-only")
    ap.add_argument("--confidence", type=float, default=None,
                    help="--budget-confidence for the budget search (default: the point figure)")
    ap.add_argument("--order", default="sensitivity", help="fallback order for the budget search")
    ap.add_argument("--sensitivity-images", type=int, default=None,
                    help="search images the per-layer sensitivity pass uses (the first of the search set) "
                         "[default: sedeploy.int8_budget.SENSITIVITY_IMAGES]")
    args = ap.parse_args(argv)
    if reference_missing(args):
        return 2

    from common import time_activated, write_results
    from sedeploy.errors import SedeployError
    from sedeploy.backends.timing import paired_speedup
    from sedeploy.quantize import calibrate
    from sedeploy.quantize import quantize_model
    from sedeploy.int8_budget import Budget, quantize_to_budget
    from sedeploy.preprocess import load_batch

    work = args.work
    fp32, pp, x, y = prepare(args.checkpoint, args.size, args.data, work)
    res: dict = {"model": f"trained reference SE-ResNet-50 ({args.checkpoint.name}), {args.size} px",
                 "val_images": int(len(x)), "calibration": f"{args.calib_count} Imagenette train images, seed 0",
                 "rows": {}}
    ref = {"cpu": run_logits(fp32, "cpu", "fp32", x), "ov": run_logits(fp32, "ov", "fp32", x)}
    res["fp32_top1_pct"] = {f: pct(r.argmax(1) == y) for f, r in ref.items()}
    res["fp32_ort_vs_ov_agreement_pct"] = pct(ref["cpu"].argmax(1) == ref["ov"].argmax(1))

    cals = {m: calibrate(fp32, args.data / "train", method=m, count=args.calib_count, preprocess=pp,
                         progress=False, cache_dir=work / "cache")
            for m in ((args.method,) if args.budget_only else ("percentile", "mse"))}
    variants = [("cpu", "percentile", {}), ("cpu", "mse", {}),
                ("cpu", "percentile", {"bias_correction": False}),
                ("ov", "percentile", {}), ("ov", "mse", {}),
                ("ov", "percentile", {"bias_correction": True}), ("ov", "mse", {"bias_correction": True}),
                ("ov", "percentile", {"se": "fp32"}),
                ("cpu", "mse", {"head": "int8"}), ("ov", "mse", {"head": "int8"})]
    if args.budget_only:
        return budget_only(args, fp32, x, y, ref["ov"], pp, work)
    # activation–weight rebalancing: a second FP32 graph (same function), calibrated and quantized like the first
    from sedeploy.preprocess import find_images as _find

    cal_x, _ = load_batch(_find(args.data / "train").paths[:: max(1, 5000 // args.calib_count)][: args.calib_count],
                          pp)
    smoothed, pairs = smooth(fp32, cal_x, work / "engines" / "reference.smooth.fp32.onnx")
    res["smoothquant_pairs"] = pairs
    scal = calibrate(smoothed, args.data / "train", method="mse", count=args.calib_count, preprocess=pp,
                     progress=False, cache_dir=work / "cache")
    arts = {}
    for flavour in ("cpu", "ov"):
        name = f"{flavour} mse smoothquant-0.5"
        art = work / "variants" / f"{flavour}_smooth.onnx"
        art.parent.mkdir(exist_ok=True)
        quantize_model(smoothed, scal, art, flavour=flavour)
        got = run_logits(art, flavour, "int8", x)
        res["rows"][name] = {"agreement_pct": pct(got.argmax(1) == ref[flavour].argmax(1)),
                             "top1_pct": pct(got.argmax(1) == y)}
        print(name, res["rows"][name], flush=True)
    for flavour, method, kw in variants:
        name = f"{flavour} {method}" + "".join(f" {k}={v}" for k, v in kw.items())
        art = work / "variants" / (name.replace(" ", "_").replace("=", "-") + ".onnx")
        art.parent.mkdir(exist_ok=True)
        quantize_model(fp32, cals[method], art, flavour=flavour, **kw)
        got = run_logits(art, flavour, "int8", x)
        res["rows"][name] = {"agreement_pct": pct(got.argmax(1) == ref[flavour].argmax(1)),
                             "top1_pct": pct(got.argmax(1) == y)}
        arts[name] = art
        print(name, res["rows"][name], flush=True)

    # the budget: searched on the first --budget-images val images, measured on the rest
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    search, held = order[: args.budget_images], order[args.budget_images:]
    # the budget runs on the flavour's defaults (bias correction as DEFAULT_BIAS_CORRECTION) with the better estimator
    best = max(("ov percentile", "ov mse"), key=lambda n: res["rows"][n]["agreement_pct"])
    method = best.split()[1]
    budget_art = work / "budget" / "reference.int8-ov.onnx"
    budget_art.parent.mkdir(exist_ok=True)
    budget = None
    try:
        _, rep = quantize_to_budget(fp32, cals[method], budget_art, flavour="ov", images=x[search], labels=y[search],
                                    budget=Budget(min_agreement=args.budget), threads=2)
        budget = rep.as_dict()
    except SedeployError as err:  # recorded; the rest of the report still stands
        res["budget_error"] = str(err)
    if budget is not None:
        got = run_logits(budget_art, "ov", "int8", x[held])
        budget["heldout_after_search"] = {"images": int(len(held)),
                                          "agreement_pct": pct(got.argmax(1) == ref["ov"][held].argmax(1)),
                                          "top1_pct": pct(got.argmax(1) == y[held]),
                                          "fp32_top1_pct": pct(ref["ov"][held].argmax(1) == y[held])}
        res["budget"] = {"base": best, **{k: budget[k] for k in ("fell_back", "all_int8", "result", "speed",
                                                                 "heldout_after_search", "seconds")}}

    # speed at batch 8, interleaved per runtime
    res["speed_b8"] = {}
    for flavour, names in (("cpu", ["cpu percentile", "cpu mse", "cpu mse head=int8"]),
                           ("ov", ["ov percentile", best, "ov mse head=int8"])):
        runners = {"fp32": make_runner(fp32, flavour, "fp32")}
        runners.update({n: make_runner(arts[n], flavour, "int8") for n in dict.fromkeys(names)})
        if flavour == "ov" and budget is not None:
            runners["ov budget"] = make_runner(budget_art, "ov", "int8")
        t = time_activated(runners, x[:8], batch_sizes=(8,), warmup=3, repeats=args.repeats, settle=1)
        res["speed_b8"][flavour] = {n: {"img_s": round(8 / float(np.median(t.samples[n][8])), 1),
                                        "x_fp32": round(paired_speedup(t.samples["fp32"][8], t.samples[n][8]), 3)}
                                    for n in runners}

    lines = [f"# INT8 on the {res['model']}", "",
             f"Agreement: top-1 agreement with FP32 on Imagenette val ({res['val_images']} images), each flavour run "
             f"by its runtime (cpu: ONNX Runtime, ov: OpenVINO); calibration: {res['calibration']}. FP32 top-1: "
             f"{res['fp32_top1_pct']}.", "", "| INT8 variant | agreement | top-1 |", "|---|---|---|"]
    lines += [f"| {n} | {r['agreement_pct']} % | {r['top1_pct']} % |" for n, r in res["rows"].items()]
    if "budget" in res:
        b = res["budget"]
        h = b["heldout_after_search"]
        lines += ["", f"Budget --min-agreement {args.budget} on OpenVINO INT8 ({b['base']}), searched on "
                  f"{args.budget_images} val images: {len(b['fell_back'])} layer(s) fell back ({', '.join(b['fell_back'])}); "
                  f"search-set agreement {b['all_int8']['agreement_pct']} % → {b['result']['agreement_pct']} %; on the "
                  f"other {h['images']} val images: **{h['agreement_pct']} %** agreement, top-1 {h['top1_pct']} % "
                  f"(FP32 {h['fp32_top1_pct']} %)."]
    elif "budget_error" in res:
        lines += ["", f"Budget search failed: {res['budget_error']}"]
    lines += ["", "Speed, batch 8, interleaved per runtime (median of per-round ratios):", "",
              "| runtime | engine | img/s | × FP32 |", "|---|---|---|---|"]
    for flavour, rows in res["speed_b8"].items():
        for n, s in rows.items():
            lines.append(f"| {'ONNX Runtime' if flavour == 'cpu' else 'OpenVINO'} | {n} | {s['img_s']} | {s['x_fp32']} |")
    print("\n".join(lines))
    write_results(__file__, res, "\n".join(lines), argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
