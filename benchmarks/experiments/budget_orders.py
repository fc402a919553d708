"""The accuracy budget's two fallback orders timed side by side on the trained reference (OpenVINO flavour).

``benchmarks/reference_int8.py --budget-only --order sensitivity|gain-per-cost`` each time their artifact against
FP32 in their own run; a comparison between the two counts only when they are timed interleaved in one run. This
script rebuilds the artifact each budget result file describes (same export, same calibration, the recorded layers
kept in float with :func:`sedeploy.quantize.float_groups`), checks that it reproduces the recorded held-out agreement,
and times OpenVINO FP32, every-layer INT8 and each budgeted artifact interleaved at batch 1 and 8
(:func:`sedeploy.backends.timing.time_runners`: round-robin with rotated order, one settle call before each timed
call; the timer covers one synchronous OpenVINO ``infer``, host numpy in → out; ratios are medians of per-round
ratios to FP32).

    python benchmarks/experiments/budget_orders.py benchmarks/results/reference_int8/budget-99-2000-c0.95-*.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from reference_int8 import add_reference_args, make_runner, pct, prepare, reference_missing, run_logits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("budgets", nargs="+", type=Path, help="budget result JSONs written by reference_int8.py")
    add_reference_args(ap, repeats=25)
    args = ap.parse_args(argv)
    if reference_missing(args):
        return 2

    from common import time_activated, write_results
    from sedeploy.backends.timing import paired_speedup
    from sedeploy.quantize import calibrate
    from sedeploy.quantize import float_groups, quantize_model
    from sedeploy.onnxcore import sha256_file

    fp32, pp, x, y = prepare(args.checkpoint, args.size, args.data, args.work)
    ckpt = sha256_file(args.checkpoint)
    ref = run_logits(fp32, "ov", "fp32", x)
    out = args.work / "budget-orders"
    out.mkdir(exist_ok=True)
    arts, rows = {"all INT8": out / "all.onnx"}, {}
    records = [(f, json.loads(f.read_text())) for f in args.budgets]
    for key in ("method", "search_images", "order"):  # one calibration and one held-out split for all of them
        values = [rec.get(key) for _, rec in records]
        if key == "order" and len(set(values)) != len(values) or key != "order" and len(set(values)) > 1:
            print(f"the budget records differ in {key!r} ({values}); pass records of one calibration and split, "
                  "one per fallback order")
            return 2
    cal = None
    for f, rec in records:
        if rec.get("checkpoint_sha256") != ckpt:
            print(f"{f}: recorded for checkpoint {str(rec.get('checkpoint_sha256'))[:12]}, not "
                  f"{ckpt[:12]} ({args.checkpoint}); rerun its budget search first")
            return 2
        if cal is None:
            cal = calibrate(fp32, args.data / "train", method=rec["method"], count=args.calib_count, preprocess=pp,
                            progress=False, cache_dir=args.work / "cache")
            quantize_model(fp32, cal, arts["all INT8"], flavour="ov")
        name = f"budget {rec['order']}"
        groups = float_groups(fp32, rec["fell_back"], "ov")
        arts[name] = out / f"{rec['order']}.onnx"
        quantize_model(fp32, cal, arts[name], flavour="ov", exclude=sorted({n for g in groups.values() for n in g}))
        held = np.random.default_rng(0).permutation(len(x))[rec["search_images"]:]
        got = run_logits(arts[name], "ov", "int8", x[held])
        agree = pct(got.argmax(1) == ref[held].argmax(1))
        if agree != rec["heldout"]["agreement_pct"]:
            print(f"{f}: the rebuilt artifact gives {agree} % held-out agreement, the record says "
                  f"{rec['heldout']['agreement_pct']} %: not the same artifact")
            return 3
        rows[name] = {"layers_in_float": len(rec["fell_back"]), "heldout_agreement_pct": agree,
                      "heldout_images": int(len(held)), "source": f.name}
    rows["all INT8"] = {"layers_in_float": 0, "heldout_agreement_pct": pct(
        run_logits(arts["all INT8"], "ov", "int8", x[held]).argmax(1) == ref[held].argmax(1)),
        "heldout_images": int(len(held))}

    runners = {"fp32": make_runner(fp32, "ov", "fp32"), **{n: make_runner(p, "ov", "int8") for n, p in arts.items()}}
    t = time_activated(runners, x[:8], batch_sizes=(1, 8), warmup=3, repeats=args.repeats, settle=1)
    speed = {b: {n: {"median_ms": round(float(np.median(t.samples[n][b])) * 1e3, 2),
                     "x_fp32": round(paired_speedup(t.samples["fp32"][b], t.samples[n][b]), 3)}
                 for n in runners} for b in (1, 8)}
    res = {"model": f"trained reference SE-ResNet-50 ({args.checkpoint.name}), {args.size} px",
           "checkpoint_sha256": ckpt, "rows": rows, "speed": speed, "repeats": args.repeats,
           "timer": "one synchronous OpenVINO infer per sample (host numpy in → out), 2 threads, interleaved; "
                    "x_fp32 = median of per-round FP32/engine time ratios"}
    lines = [f"# Budget fallback orders on the {res['model']}, OpenVINO flavour, timed in one run", "",
             "| engine | layers in float | held-out agreement | × FP32 b1 | × FP32 b8 | ms b8 |", "|---|---|---|---|---|---|"]
    for n in runners:
        r = rows.get(n, {})
        lines.append(f"| {n} | {r.get('layers_in_float', '—')} | "
                     f"{str(r['heldout_agreement_pct']) + ' %' if r else '(reference)'} | {speed[1][n]['x_fp32']} | "
                     f"{speed[8][n]['x_fp32']} | {speed[8][n]['median_ms']} |")
    lines += ["", f"Held-out: the {rows['all INT8']['heldout_images']} val images no budget search saw. "
              f"{args.repeats} interleaved rounds per batch size; {res['timer']}."]
    md = "\n".join(lines)
    print(md)
    write_results(__file__, res, md, argv=sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
