"""Merge the `sedeploy bench` runs of benchmarks/headline.py into headline.json, headline.md and one plot.

Reads each run's results.json (it has every figure and the raw samples) so this table can be remade without
re-measuring:  python benchmarks/headline_table.py benchmarks/results/headline
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load_runs(out: Path) -> list[dict]:
    runs = []
    for f in sorted(out.glob("*/results.json")):
        stage = f.parent.name.split("-", 1)[0]
        runs.append({"stage": stage, "run": f.parent.name, "results": json.loads(f.read_text())})
    return runs


#: results of schema sedeploy.bench/1 named the backends "onnxruntime" / "tensorrt"
_OLD_BACKEND_NAMES = {"onnxruntime": "ort", "tensorrt": "trt"}


def _backend(e: dict) -> str:
    return _OLD_BACKEND_NAMES.get(e.get("backend"), e.get("backend"))


def _kind(e: dict) -> str:
    name, flavour = e["name"].lower(), (e.get("flavour") or "").lower()
    if _backend(e) == "pytorch":
        return "PyTorch eager FP32"
    if _backend(e) == "trt":
        return f"TensorRT {e['precision'].upper()}"
    if flavour == "no-se":
        return "ORT FP32, plain ResNet (no SE)"
    if "unfused" in name:
        return "ORT FP32 (SE unfused)"
    if e["precision"] == "fp16":
        return "ORT FP16"
    if e["precision"] == "int8":
        return "ORT INT8 " + ("TensorRT Q/DQ flavour" if "int8-trt" in name else "CPU flavour (uint8 QOperator)")
    return "ORT FP32 (SE fused)"


def _tp(e: dict, b: str) -> str:
    s = e.get("batch", {}).get(b)
    if not s:
        return "–"
    spread = s.get("spread", {}).get("iqr_pct")
    return f"{s['throughput']:.1f}" + (f" ±{spread / 2:.0f}%" if spread is not None else "")


def _num(x, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _machine_line(m: dict) -> str:
    v = m.get("versions", {})
    return (f"{m.get('cpu', '?')} ({', '.join(m.get('cpu_features', []) or [])}), {m.get('usable_cores', '?')} usable "
            f"cores, {m.get('ram_gib', '?')} GiB; {m.get('os', '?')}; Python {m.get('python', '?')}, "
            + ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnx", "torch", "tensorrt") if v.get(k)))


def _ratio(e: dict, b: str) -> str:
    s = e.get("batch", {}).get(b) or {}
    r = s.get("speedup_vs_reference")
    return f"{r:.2f}×" if r is not None else "–"


def _speed_table(run: dict) -> list[str]:
    res = run["results"]
    model = res["engines"][0].get("model", run["run"])
    lines = [f"### {model} ({res['engines'][0].get('gflops_total', 0):.2f} GFLOP/image total)", "",
             "img/s, median (± half the IQR) of interleaved rounds; × = paired speed ratio vs ORT FP32 fused. "
             "Agreement: top-1 vs FP32 on ImageNet val images — the weights are random here, whose near-tied logits "
             "flip easily, so it is a smoke test; drift that means something is in the next section.", "",
             "| engine | b1 | b8 | b32 | × FP32 b1 | × FP32 b8 | × FP32 b32 | top-1 agreement vs FP32 (random weights) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in res["engines"]:
        acc = e.get("accuracy") or {}
        agree = acc.get("top1_agreement_pct")
        lines.append(f"| {_kind(e)} | {_tp(e, '1')} | {_tp(e, '8')} | {_tp(e, '32')} | {_ratio(e, '1')} | "
                     f"{_ratio(e, '8')} | {_ratio(e, '32')} | "
                     + (f"{agree:.1f} % ({acc.get('n_images')} img)" if agree is not None else "–") + " |")
    return lines


def _drift_table(runs: list[dict]) -> list[str]:
    lines = ["| engine | input | top-1 % | Δ top-1 pts | agreement % | right→wrong | wrong→right | mean KL | images |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        size = run["run"].rsplit("-", 1)[-1]
        for e in run["results"]["engines"]:
            a = e.get("accuracy")
            if not a:
                continue
            drop = a.get("top1_drop_pts")
            lines.append(f"| {_kind(e)} | {size} px | {a.get('top1_pct', float('nan')):.2f} | "
                         + (f"{-drop + 0.0:+.2f}" if drop is not None else "–")  # + 0.0: no "-0.00"
                         + f" | {a.get('top1_agreement_pct', float('nan')):.2f} | {a.get('flips_right_to_wrong', '–')}"
                         f" | {a.get('flips_wrong_to_right', '–')} | {a.get('mean_kl', float('nan')):.2e} | "
                         f"{a.get('n_images')} |")
    return lines


def _flops_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        for e in run["results"]["engines"]:
            s = e.get("batch", {}).get("8")
            if s:
                rows.append({"run": run["run"], "model": e.get("model"), "kind": _kind(e),
                             "gflops_total": e.get("gflops_total"), "gflops_seed": e.get("gflops_seed"),
                             "throughput_b8": s["throughput"]})
    return rows


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind in sorted({r["kind"] for r in rows}):
        pts = sorted((r["gflops_total"], r["throughput_b8"], r["model"]) for r in rows if r["kind"] == kind
                     and r["gflops_total"])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        for x, y, m in pts:
            ax.annotate(str(m).replace("SE-ResNet-", "").replace("se-resnet", ""), (x, y), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("GFLOP per image (2 × multiply-adds, total)")
    ax.set_ylabel("images / s at batch 8")
    ax.set_title("Throughput vs FLOPs (ONNX Runtime CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_headline(runs: list[dict] | None, out: Path) -> None:
    runs = _load_runs(out)  # always from the files: one source of truth
    if not runs:
        sys.exit(f"no */results.json under {out}")
    machine = runs[0]["results"].get("machine", {})
    speed = sorted((r for r in runs if r["stage"] == "speed"), key=lambda r: r["results"]["engines"][0].get("depth") or 0)
    drift = [r for r in runs if r["stage"] == "drift"]
    flops = _flops_rows([r for r in runs if r["stage"] in ("speed", "flops")])
    md = ["# sedeploy headline benchmark", "",
          f"Machine: {_machine_line(machine)}", "",
          "Made by `python benchmarks/headline.py`; each run's full figures (raw samples included) are in its "
          "folder's results.json. Timer: one engine call on a host batch (preprocessing excluded), "
          "right after one untimed call of the same engine (`--settle 1`: warm caches and threads, as in serving).", ""]
    if speed:
        md += ["## Speed on ONNX Runtime CPU", ""]
        if not any(_backend(e) == "trt" for r in speed for e in r["results"]["engines"]):
            md += ["No TensorRT rows: this machine has no NVIDIA GPU and no TensorRT. `headline.py` builds TensorRT "
                   "plans from the same FP32/FP16/INT8-Q/DQ artifacts and adds their rows where both are present.",
                   ""]
    for r in speed:
        md += _speed_table(r) + [""]
        se = r["results"].get("se_cost")
        if se:
            md += ["What SE costs (ORT FP32, same depth without SE, paired rounds of the same run): "
                   + "; ".join(f"b{c['batch']}: {_num(c.get('se_time_over_plain'))}× the time for "
                               f"{_num(c.get('se_flops_over_plain'), '.3f')}× the FLOPs" for c in se), ""]
        for note in r["results"].get("notes") or []:
            md.append(f"- {note}")
        md.append("")
    if drift:
        md += ["## Drift on the trained reference SE-ResNet-50 (Imagenette val)", ""] + _drift_table(drift) + [""]
    if flops:
        md += ["## Throughput vs FLOPs (batch 8)", "", "| model | engine | GFLOP total | img/s b8 |",
               "|---|---|---|---|"]
        md += [f"| {r['model']} | {r['kind']} | {r['gflops_total']:.2f} | {r['throughput_b8']:.1f} |"
               for r in sorted(flops, key=lambda r: (r["kind"], r["gflops_total"] or 0))]
        md.append("")
        if _plot(flops, out / "throughput_vs_gflops.png"):
            md += ["![throughput vs GFLOPs](throughput_vs_gflops.png)", ""]
    (out / "headline.md").write_text("\n".join(md))
    (out / "headline.json").write_text(json.dumps({"machine": machine, "flops": flops,
                                                   "runs": [{"stage": r["stage"], "run": r["run"]} for r in runs]},
                                                  indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    write_headline(None, Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "headline"))
