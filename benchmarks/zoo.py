"""Third-party classifiers through the product's own commands: does every zoo model build with the defaults, and how
do its engines compare with OpenVINO + NNCF on accuracy and speed?

For each model in ``../shared/data/models`` (its README gives provenance and preprocessing) this runs, as a user
would, with the model's own preprocessing options and nothing else:

1. ``sedeploy build-engine MODEL --fp16 --int8 --calib CALIB --val BUDGET`` (64 seeded calibration images of
   imagenet-val-1300; ``--val`` so that calibration uses all 64 and the build's INT8 check measures on up to 256
   other images) — exit code, SE blocks found / fused, the INT8 check the build prints, notes; a fixed-batch model
   is built a second time with ``--dynamic-batch`` for the batch-8 timings;
2. ``sedeploy bench OUT --peers --images EVAL --labels … --batch 1,8`` — every engine and the two peers (OpenVINO
   FP32, OpenVINO + NNCF INT8 with NNCF's default preset on the same 64 images) timed interleaved in one process,
   with top-1, agreement with FP32 and top-1 drop on the evaluation images (none of them calibrated on);
3. ``sedeploy build-engine MODEL --int8 --min-agreement 97 --budget-confidence 0.95 --val BUDGET`` — the accuracy
   budget's held-out agreement, layers in float and speed.

The images are split once (seed 0): 64 calibration, 400 for the budget search, the rest (836) for evaluation.
PP-OCR's text-direction classifier is not an ImageNet model: it is scored by agreement with its FP32 outputs only.

    python benchmarks/zoo.py [--models NAME …] [--repeats 20] [--eval-limit N]

Writes ``benchmarks/results/zoo/`` (results.json, results.md; each model's bench results under ``<model>/``).
About 25 min on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, provenance, provenance_markdown, results_dir  # noqa: E402

MODELS_DIR = SHARED_DATA / "models"
VAL = SHARED_DATA / "imagenet-val-1300"

#: each model's preprocessing as its models/README.md states it, in sedeploy's options (nothing else is tuned)
ZOO: dict[str, dict[str, Any]] = {
    "efficientnet_lite0_torch_legacy": {
        "flags": ["--mean", "127,127,127", "--std", "128,128,128", "--resize", "256"], "imagenet": True},
    "mobilenet_v1_0.25_224_tf2onnx": {
        "flags": ["--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5", "--resize", "256",
                  "--label-offset", "1"], "imagenet": True, "label_offset": 1},
    "mobilenet_v1_0.25_224_tf2onnx_nchw": {
        "flags": ["--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5", "--resize", "256",
                  "--label-offset", "1"], "imagenet": True, "label_offset": 1},
    "squeezenet1.1_gluon_webnn": {
        "flags": ["--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375", "--resize", "256"],
        "imagenet": True},
    "ppocr_textdir_cls_paddle2onnx_op13": {
        "flags": ["--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5", "--input-shape", "48x192",
                  "--channel-order", "bgr", "--resize-mode", "pad"], "imagenet": False},
}


def _split(tmp: Path, seed: int = 0) -> dict[str, Path]:
    """calib (64) / budget (400) / eval (the rest) folders of symlinks, plus the labels files of the last two."""
    labels = dict(line.split("\t") for line in (VAL / "labels.tsv").read_text().splitlines() if "\t" in line)
    files = sorted(labels)
    random.Random(seed).shuffle(files)
    parts = {"calib": files[:64], "budget": files[64:464], "eval": files[464:]}
    out = {}
    for name, chosen in parts.items():
        d = tmp / name
        d.mkdir()
        for f in chosen:
            (d / f).symlink_to(VAL / "images" / f)
        (tmp / f"{name}.tsv").write_text("".join(f"{f}\t{labels[f].strip()}\n" for f in chosen))
        out[name] = d
    return out


def _sedeploy(*args: str, timeout: int = 3600) -> tuple[int, dict[str, Any] | None, str]:
    proc = subprocess.run([sys.executable, "-m", "sedeploy", *args, "--json"], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    return proc.returncode, data, "\n".join(proc.stderr.strip().splitlines()[-12:])


def _engine_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for e in bench.get("engines") or []:
        acc = e.get("accuracy") or {}
        row = {"engine": e["name"], "precision": e.get("precision"), "flavour": e.get("flavour"),
               "backend": e.get("backend"), "agreement_pct": acc.get("top1_agreement_pct"),
               "top1_pct": acc.get("top1_pct"), "top1_drop_pts": acc.get("top1_drop_pts")}
        for b, stats in (e.get("batch") or {}).items():
            row[f"b{b}_img_s"] = stats.get("throughput")
            row[f"b{b}_x_ref"] = stats.get("speedup_vs_reference")
        rows.append(row)
    return rows


def run_model(name: str, split: dict[str, Path], work: Path, out: Path, *, repeats: int,
              eval_limit: int | None) -> dict[str, Any]:
    """Steps 1 and 2 for one model (the budget build is :func:`run_budget`)."""
    cfg = ZOO[name]
    model = MODELS_DIR / f"{name}.onnx"
    engines = work / name / "engines"
    rec: dict[str, Any] = {"model": model.name, "flags": cfg["flags"]}
    common = ["--calib", str(split["calib"]), "--val", str(split["budget"]), *cfg["flags"]]
    rc, build, tail = _sedeploy("build-engine", str(model), "--fp16", "--int8", *common, "-o", str(engines))
    rec["default_build"] = {"exit": rc, "stderr_tail": None if rc == 0 else tail}
    if build:
        rec["default_build"].update({k: build.get(k) for k in ("se_blocks_found", "se_blocks_fused", "notes",
                                                                "int8_check", "calibration")})
        rec["default_build"]["engines"] = [e.get("path") for e in build.get("engines") or []]
    if rc != 0:
        return rec
    if (build.get("shapes") or {}).get("static_batch"):  # a fixed-batch model times batch 8 from a dynamic copy
        engines = work / name / "engines-dynamic"
        rc, _, tail = _sedeploy("build-engine", str(model), "--fp16", "--int8", *common, "--dynamic-batch", "-o",
                                str(engines))
        rec["dynamic_batch_build"] = {"exit": rc, "stderr_tail": None if rc == 0 else tail}
        if rc != 0:
            return rec
    bench_args = ["bench", str(engines), "--peers", "--images", str(split["eval"]), "--batch", "1,8",
                  "--repeats", str(repeats), "--no-torch-baseline", "--out", str(out / name)]
    if cfg["imagenet"]:
        bench_args += ["--labels", str(split["eval"].parent / "eval.tsv"),
                       "--label-offset", str(cfg.get("label_offset", 0))]
    if eval_limit:
        bench_args += ["--image-limit", str(eval_limit)]
    rc, bench, tail = _sedeploy(*bench_args)
    rec["bench"] = {"exit": rc, "stderr_tail": None if rc == 0 else tail,
                    "engines": _engine_rows(bench) if bench else None}
    return rec


def run_budget(name: str, split: dict[str, Path], work: Path, rec: dict[str, Any]) -> None:
    """Step 3: the accuracy budget's build, recorded into ``rec``."""
    cfg = ZOO[name]
    model = MODELS_DIR / f"{name}.onnx"
    budget_dir = work / name / "budget"
    rc, budget, tail = _sedeploy("build-engine", str(model), "--int8", "--calib", str(split["calib"]), *cfg["flags"],
                                 "--min-agreement", "97", "--budget-confidence", "0.95", "--val",
                                 str(split["budget"]), "-o", str(budget_dir))
    rec["budget_build"] = {"exit": rc, "stderr_tail": None if rc == 0 else tail,
                           "int8_budget": (budget or {}).get("int8_budget")}


def _fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def _budget_cell(form: str, v: dict[str, Any]) -> str:
    a, b = v.get("all_int8") or {}, v.get("result") or {}
    speed = (v.get("speed") or {}).get("speedup_vs_fp32") or {}
    timed = (f", {_fmt(speed.get('int8_all'), '.2f')} → {_fmt(speed.get('int8_budget'), '.2f')}×" if speed else "")
    return (f"{form}: {_fmt(a.get('agreement_pct'))} ({_fmt(a.get('agreement_lcb_pct'))}) → "
            f"{_fmt(b.get('agreement_pct'))} ({_fmt(b.get('agreement_lcb_pct'))}), "
            f"{len(v.get('fell_back') or [])}/{v.get('layers')} float{timed}")


def markdown(records: list[dict[str, Any]], prov: dict[str, Any]) -> str:
    runs = {}  # the runs these records come from (several after --update), each with its models
    for r in records:
        p = r.get("provenance") or prov
        runs.setdefault(json.dumps(p, sort_keys=True, default=str), (p, []))[1].append(r["model"])
    head = [provenance_markdown(prov)] if len(runs) == 1 else [
        f"Run {i}: {', '.join(models)}\n\n{provenance_markdown(p)}" for i, (p, models) in enumerate(runs.values(), 1)]
    lines = ["# Third-party classifiers with the defaults", "", "\n\n".join(head), "",
             "| model | default build | SE fused | engine | agreement % | top-1 Δ pt | b1 × FP32 | b8 × FP32 "
             "| b1 × NNCF | b8 × NNCF |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        b = r["default_build"]
        built = "exit 0" if b["exit"] == 0 else f"**exit {b['exit']}**"
        se = f"{b.get('se_blocks_fused')}/{b.get('se_blocks_found')}" if b.get("se_blocks_found") is not None else "–"
        rows = (r.get("bench") or {}).get("engines") or [{}]
        nncf = next((e for e in rows if "nncf" in str(e.get("engine"))), {})
        for i, e in enumerate(rows):
            head = (r["model"], built, se) if i == 0 else ("", "", "")
            vs = [None if e.get(f"b{b}_x_ref") is None or not nncf.get(f"b{b}_x_ref") else
                  e[f"b{b}_x_ref"] / nncf[f"b{b}_x_ref"] for b in (1, 8)]
            drop = e.get("top1_drop_pts")
            lines.append(f"| {' | '.join(head)} | {e.get('engine', '–')} | {_fmt(e.get('agreement_pct'))} | "
                         f"{_fmt(None if drop is None else -drop, '+.2f')} | {_fmt(e.get('b1_x_ref'), '.2f')} | "
                         f"{_fmt(e.get('b8_x_ref'), '.2f')} | {_fmt(vs[0], '.2f')} | {_fmt(vs[1], '.2f')} |")
    lines += ["", "Budget builds (`--min-agreement 97 --budget-confidence 0.95 --val` the 400 search images): per INT8 "
              "form, top-1 agreement with FP32 on those images and its 95 % lower bound, with every layer in INT8 → "
              "as built; the layers the search put back in float; batch-8 speed × FP32 (all-INT8 → as built, timed "
              "interleaved by the build; the TensorRT form is not timed without a GPU).", "",
              "| model | exit | per form: agreement % (bound) all-INT8 → built, layers in float, speed × FP32 |",
              "|---|---|---|"]
    for r in records:
        bb = r.get("budget_build") or {}
        flavours = ((bb.get("int8_budget") or {}).get("flavours") or {})
        text = "; ".join(_budget_cell(k, v) for k, v in flavours.items())
        if bb.get("exit") not in (None, 0) and bb.get("stderr_tail"):
            text = next((ln.strip() for ln in bb["stderr_tail"].splitlines() if ln.startswith("error:")), "")[:300]
        if bb.get("provenance"):  # kept from an earlier run by --update
            text += f" (commit {bb['provenance'].get('git_commit')}, {bb['provenance'].get('date_utc')} UTC)"
        lines.append(f"| {r['model']} | {bb.get('exit', '–')} | {text or '–'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", choices=sorted(ZOO), help="default: every zoo model")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds per engine and batch (default 20)")
    ap.add_argument("--eval-limit", type=int, help="score on the first N evaluation images only")
    ap.add_argument("--no-budget", action="store_true", help="skip step 3 (the budget builds, the slowest part)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other models' records of the existing results.json (each record says which run, "
                         "commit and machine it comes from); a rerun model's budget record is kept under --no-budget")
    args = ap.parse_args(argv)
    if not MODELS_DIR.is_dir():
        print(f"zoo: {MODELS_DIR} is absent (../shared/data beside the checkout)", file=sys.stderr)
        return 2
    out = results_dir(__file__)
    prov = provenance(__file__, argv)
    records = []
    old: dict[str, dict[str, Any]] = {}
    if args.update and (out / "results.json").is_file():
        before = json.loads((out / "results.json").read_text())
        old = {r["model"]: {"provenance": before.get("provenance"), **r} for r in before.get("models", [])}
    with tempfile.TemporaryDirectory(prefix="sedeploy-zoo-") as tmp:
        split = _split(Path(tmp))
        names = args.models or list(ZOO)

        def save():
            fresh = {r["model"] for r in records}
            kept = [r for m, r in old.items() if m not in fresh]
            everything = sorted([*kept, *records], key=lambda r: list(ZOO).index(r["model"].removesuffix(".onnx")))
            (out / "results.json").write_text(json.dumps({"provenance": prov, "models": everything}, indent=1,
                                                         default=str) + "\n")
            (out / "results.md").write_text(markdown(everything, prov))

        for name in names:
            print(f"zoo: {name}", file=sys.stderr, flush=True)
            rec = run_model(name, split, Path(tmp), out, repeats=args.repeats, eval_limit=args.eval_limit)
            rec["provenance"] = prov
            if args.no_budget and "budget_build" in old.get(rec["model"], {}):
                rec["budget_build"] = {**old[rec["model"]]["budget_build"],
                                       "provenance": old[rec["model"]].get("provenance")}
            records.append(rec)
            save()
        for name, rec in zip(names, records):
            if not args.no_budget and rec["default_build"]["exit"] == 0:
                print(f"zoo: {name} (budget)", file=sys.stderr, flush=True)
                run_budget(name, split, Path(tmp), rec)
                save()
    print(markdown(records, prov))
    return 0 if all(r["default_build"]["exit"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
