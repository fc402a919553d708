"""Is sedeploy's CPU engine ahead of OpenVINO's own, or only level with it? The product's run, with intervals.

For each depth (random weights: speed does not depend on them), exactly what a user types:

    sedeploy build-engine --depth D --int8 -o WORK/se-resnetD/engines     (default backend: the fastest installed)
    sedeploy bench WORK/se-resnetD/engines --peers --batch 1,8 --repeats R --out benchmarks/results/peers_interval/se-resnetD

``bench --peers`` times sedeploy's engines, OpenVINO FP32 reading the same ``.fp32.onnx`` (``peer:openvino-fp32``),
OpenVINO + NNCF INT8 (NNCF's default preset on the same calibration images, ``peer:openvino-nncf-int8``) and
PyTorch eager, interleaved in one process (round-robin, rotated order, one settle call before each timed call; the
timer covers one synchronous infer call, host numpy in → out). From the per-call samples in its results.json this
script pairs each sedeploy engine with its peer round by round: the median of per-round ratios
(:func:`sedeploy.backends.timing.paired_speedup`) and its 95 % sign-test interval
(:func:`sedeploy.backends.timing.speedup_interval`). A lead is shown only when the interval's low end is above 1.

    python benchmarks/peers_interval.py [--depths 50 101] [--repeats 40] [--work /tmp/peers-interval]
    python benchmarks/peers_interval.py --replot      # tables and plot again from the committed bench outputs
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import results_dir, write_results  # noqa: E402

PAIRS = (("FP32", "fp32.ov.xml", "peer:openvino-fp32", 1.0),
         ("INT8", "int8-ov.ov.xml", "peer:openvino-nncf-int8", 1.1))  # (label, engine suffix, peer, target)


def run_depth(depth: int, repeats: int, work: Path, out: Path) -> dict:
    engines = work / f"se-resnet{depth}" / "engines"
    sedeploy = [sys.executable, "-m", "sedeploy"]
    # always built by this sedeploy: engines of an earlier checkout would be timed as if they were this one's
    subprocess.run([*sedeploy, "build-engine", "--depth", str(depth), "--int8", "-o", str(engines)], check=True,
                   cwd=work)
    subprocess.run([*sedeploy, "bench", str(engines), "--peers", "--batch", "1,8", "--repeats", str(repeats),
                    "--out", str(out)], check=True)
    return json.loads((out / "results.json").read_text())


def pairs(results: dict) -> list[dict]:
    from sedeploy.backends.timing import paired_speedup, speedup_interval

    by_name = {e["name"]: e for e in results["engines"]}
    rows = []
    for label, suffix, peer, target in PAIRS:
        engine = next((n for n in by_name if n.endswith(suffix)), None)
        if engine is None or peer not in by_name:
            raise SystemExit(f"bench results lack {suffix!r} or {peer!r}: {sorted(by_name)}")
        for b in sorted(set(by_name[engine]["batch"]) & set(by_name[peer]["batch"]), key=int):
            s_eng = by_name[engine]["batch"][b]["samples_s"]
            s_peer = by_name[peer]["batch"][b]["samples_s"]
            ci = speedup_interval(s_peer, s_eng)
            rows.append({"precision": label, "engine": engine, "peer": peer, "batch": int(b),
                         "rounds": min(len(s_eng), len(s_peer)), "target": target,
                         "engine_p50_ms": round(by_name[engine]["batch"][b]["latency_ms"]["p50"], 2),
                         "peer_p50_ms": round(by_name[peer]["batch"][b]["latency_ms"]["p50"], 2),
                         "x_peer": round(paired_speedup(s_peer, s_eng), 3),
                         "ci95": list(ci) if ci else None,
                         "verdict": verdict(ci, target)})
    return rows


def shown(ci) -> str:
    """The interval rounded outwards to 3 decimals (a low end of 1.0005 shows as 1.000, never as more)."""
    return f"{math.floor(ci[0] * 1000) / 1000:.3f}–{math.ceil(ci[1] * 1000) / 1000:.3f}" if ci else "–"


def verdict(ci, target: float) -> str:
    if ci is None:
        return "too few rounds"
    lo, hi = ci
    if lo >= target:
        return f"target ≥ {target:.2f}× met (whole interval; low end {lo:.4f})"
    if hi < target:
        return f"target ≥ {target:.2f}× missed (whole interval below)"
    return f"not decided: the interval contains {target:.2f}×"


def plot(all_rows: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(d, r) for d, rows in all_rows.items() for r in rows if r["ci95"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(items) + 1.6))
    for i, (d, r) in enumerate(items):
        lo, hi = r["ci95"]
        colour = "tab:blue" if r["precision"] == "FP32" else "tab:orange"
        ax.plot([lo, hi], [i, i], color=colour, lw=3, alpha=0.6)
        ax.plot([r["x_peer"]], [i], "o", color=colour)
        ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([f"SE-ResNet-{d} {r['precision']} b{r['batch']} vs {r['peer'].split(':')[1]}"
                        for d, r in items])
    ax.invert_yaxis()
    ax.set_xlabel("× the OpenVINO peer (dot: median of per-round ratios; bar: 95 % interval)")
    ax.set_title("sedeploy's OpenVINO engines vs OpenVINO's own, same run (black tick: target; > 1: sedeploy "
                 "faster)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(all_rows: dict[int, list[dict]], runs: dict[int, dict], repeats: int) -> str:
    config = next(iter(runs.values())).get("config", {})
    lines = ["# sedeploy's OpenVINO engines vs OpenVINO FP32 and OpenVINO + NNCF INT8, with 95 % intervals", "",
             f"`sedeploy bench --peers --batch 1,8 --repeats {repeats}` on `sedeploy build-engine --depth D --int8` "
             f"({config.get('weights', '?')} weights, {(config.get('preprocess') or {}).get('size', '?')} px; speed "
             f"only). All engines interleaved in one process, {config.get('threads', '?')} threads, "
             f"{config.get('settle_calls', '?')} settle call(s) before each timed call; the timer covers one synchronous infer call, host numpy in → out. "
             "× peer: median over rounds of peer time / engine time (> 1: sedeploy faster); 95 % interval: the "
             "sign-test interval of that median. Each depth's full bench output (all engines, PyTorch eager "
             "included) is in its folder.", "",
             "| model | precision | batch | engine p50 ms | peer p50 ms | × peer | 95 % interval | target | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d, rows in all_rows.items():
        for r in rows:
            ci = shown(r["ci95"])
            lines.append(f"| SE-ResNet-{d} | {r['precision']} vs {r['peer']} | {r['batch']} | {r['engine_p50_ms']} | "
                         f"{r['peer_p50_ms']} | {r['x_peer']:.3f} | {ci} | ≥ {r['target']:.1f}× | {r['verdict']} |")
    lines += ["", "![speed-ups with intervals](speedups.png)", ""]
    for d, res in runs.items():
        m = res.get("machine", {})
        lines.append(f"- SE-ResNet-{d}: load average during the run {m.get('loadavg')}; "
                     f"complete: {res.get('complete')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[50, 101])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/peers-interval"))
    ap.add_argument("--replot", action="store_true",
                    help="no timing: pair, tabulate and plot the bench outputs already in the results folder")
    args = ap.parse_args(argv)
    out = results_dir(__file__)
    runs, all_rows, data = {}, {}, {"repeats": args.repeats}
    if args.replot:
        previous = json.loads((out / "results.json").read_text())
        args.depths, data["repeats"] = [int(d) for d in previous["pairs"]], previous["repeats"]
        data["provenance"] = {**previous["provenance"], "replotted_by": "python benchmarks/peers_interval.py --replot"}
    else:
        args.work.mkdir(parents=True, exist_ok=True)
    for d in args.depths:
        runs[d] = (json.loads((out / f"se-resnet{d}" / "results.json").read_text()) if args.replot
                   else run_depth(d, args.repeats, args.work, out / f"se-resnet{d}"))
        all_rows[d] = pairs(runs[d])
        for r in all_rows[d]:
            print(f"SE-ResNet-{d} {r['precision']} b{r['batch']}: {r['x_peer']}× {r['peer']} "
                  f"(95 % {shown(r['ci95'])}) — {r['verdict']}", flush=True)
    plot(all_rows, out / "speedups.png")
    data["pairs"] = {str(d): rows for d, rows in all_rows.items()}
    write_results(__file__, data, markdown(all_rows, runs, data["repeats"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
