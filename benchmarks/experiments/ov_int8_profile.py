"""Where the INT8 time goes: sedeploy's ``int8-ov`` engine against OpenVINO + NNCF, layer by layer, interleaved.

For each depth (random weights, 224 px; the per-layer split does not depend on them) the script builds what a user
gets from ``sedeploy build-engine --depth D --int8`` (the ``.int8-ov.onnx`` artifact, calibrated on the shipped
``calib/`` photos) and quantizes the same ``.fp32.onnx`` with ``nncf.quantize`` (default preset) on the same images
(:func:`sedeploy.bench.peers.peer_calibration`, as ``bench --peers`` does). Both are compiled by OpenVINO with
per-layer performance counters (2 threads, f32 for non-quantized parts, LATENCY) and called alternately (the order
swapped every call), ``--calls`` times each after 3 warm-up calls, at batch ``--batch``. The run's own check is the
per-call ratio of the two totals, with its 95 % sign-test interval: on a noisy VM one 15-call profile once put
``int8-ov`` 19 % behind and a 30-call rerun level, so a profile whose totals disagree with ``bench`` is noise. Per layer: the median of its real time over the calls;
layers are grouped by OpenVINO's layer type and the precisions it ran them in (runtime precision → output
precision), and by role in the network (convolutions, SE squeeze, SE FCs, the fused SE scale + residual Add + ReLU,
other).

It also states the bound this puts on any graph form: NNCF's whole time over ``int8-ov``'s convolution time is the
speed-up sedeploy would reach if every non-convolution layer cost nothing (convolutions run the same int8 kernels on
both sides), and the cut of the other layers that a 1.1× target would need.

    python benchmarks/experiments/ov_int8_profile.py [--depths 50 101] [--batch 8] [--calls 30] \
        [--work /tmp/ov-int8-profile]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import write_results  # noqa: E402
from squeeze_first import layer_role  # noqa: E402  (the same role rule as the squeeze-first profile)

INT8, NNCF = "sedeploy int8-ov", "OpenVINO + NNCF INT8"
TARGET = 1.1


def build(depth: int, work: Path) -> Path:
    engines = work / f"se-resnet{depth}" / "engines"
    engines.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "sedeploy", "build-engine", "--depth", str(depth), "--int8", "-o",
                    str(engines)], check=True, cwd=engines.parent)
    return engines


def profile_depth(depth: int, batch: int, calls: int, work: Path) -> dict:
    import openvino as ov

    from sedeploy.backends.openvino_support import compile_config
    from sedeploy.bench.peers import nncf_int8, peer_calibration
    from sedeploy.preprocess import Preprocess

    engines = build(depth, work)
    fp32 = next(engines.glob("*.fp32.onnx"))
    int8 = next(engines.glob("*.int8-ov.onnx"))
    images, how = peer_calibration(fp32, Preprocess.for_size(224))
    core = ov.Core()
    nncf_model = nncf_int8(fp32, images, how)
    config = compile_config(threads=2, precision_hint="f32", perf_counters=True)
    compiled = {INT8: core.compile_model(core.read_model(str(int8)), "CPU", config),
                NNCF: core.compile_model(nncf_model, "CPU", config)}
    x = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
    info, times, totals, requests = {}, {}, {}, {}
    for name, c in compiled.items():
        layers = {}
        for op in c.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            get = (lambda key: str(rt[key].value) if key in rt else "")  # noqa: E731
            layers[op.get_friendly_name()] = {"layer_type": get("layerType"), "runtime": get("runtimePrecision"),
                                              "output": get("outputPrecisions"), "kernel": get("primitiveType")}
        info[name], times[name], totals[name] = layers, {}, []
        requests[name] = c.create_infer_request()
        for _ in range(3):
            requests[name].infer({0: x})
    order = list(requests)
    for k in range(calls):  # alternating, order swapped every call: a slow spell of the machine hits both alike
        for name in (order if k % 2 == 0 else order[::-1]):
            r = requests[name]
            r.infer({0: x})
            total = 0.0
            for p in r.get_profiling_info():
                if str(p.status).endswith("EXECUTED"):
                    ms = p.real_time.total_seconds() * 1e3
                    total += ms
                    times[name].setdefault((p.node_name, p.node_type), []).append(ms)
            totals[name].append(total)
    from sedeploy.backends.timing import paired_speedup, speedup_interval

    ci = speedup_interval(totals[NNCF], totals[INT8])
    out = {"calibration": how, "batch": batch, "calls": calls, "engines": {},
           "int8_ov_x_nncf_per_call_totals": {"median": round(paired_speedup(totals[NNCF], totals[INT8]), 3),
                                              "ci95": [round(v, 3) for v in ci] if ci else None}}
    for name in compiled:
        by_precision: dict[str, float] = {}
        by_role: dict[str, float] = {}
        for (layer, node_type), samples in times[name].items():
            ms = float(np.median(samples))
            i = info[name].get(layer, {})
            key = f"{i.get('layer_type') or node_type} {i.get('runtime', '?')}→{i.get('output', '?')}"
            by_precision[key] = by_precision.get(key, 0.0) + ms
            role = layer_role({"name": layer, "type": node_type})
            by_role[role] = by_role.get(role, 0.0) + ms
        out["engines"][name] = {
            "total_ms": round(float(np.median(totals[name])), 2),
            "by_role_ms": {k: round(v, 2) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
            "by_type_and_precision_ms": {k: round(v, 2) for k, v in
                                         sorted(by_precision.items(), key=lambda kv: -kv[1])}}
    ours, theirs = out["engines"][INT8], out["engines"][NNCF]
    conv = ours["by_role_ms"].get("convolutions", 0.0)
    other = ours["total_ms"] - conv
    needed = theirs["total_ms"] / TARGET - conv  # what the non-convolution layers may cost at 1.1×
    out["bound"] = {"if_every_other_layer_were_free": round(theirs["total_ms"] / conv, 3),
                    "other_layers_ms": round(other, 2), "other_layers_allowed_for_target_ms": round(needed, 2),
                    "cut_needed_pct": round(100 * (1 - needed / other), 1) if other > 0 else None,
                    "target": TARGET}
    return out


def markdown(res: dict, args) -> str:
    lines = ["# Where the INT8 time goes: sedeploy `int8-ov` vs OpenVINO + NNCF, layer by layer", "",
             f"OpenVINO per-layer counters, batch {args.batch}, 2 threads, {args.calls} alternating calls per engine "
             "(order swapped every call) after 3 warm-up calls; per layer the median real time, summed by group (the sum of medians, so a "
             "column may differ slightly from the median total). Random weights, 224 px; NNCF's default preset on "
             "the images sedeploy calibrated on.", ""]
    for depth, r in res.items():
        ours, theirs, b = r["engines"][INT8], r["engines"][NNCF], r["bound"]
        lines += [f"## SE-ResNet-{depth}", "",
                  f"Median total: **{ours['total_ms']} ms** (`int8-ov`) vs **{theirs['total_ms']} ms** (NNCF); "
                  f"per-call ratio NNCF / int8-ov {r['int8_ov_x_nncf_per_call_totals']['median']} (95 % "
                  f"{r['int8_ov_x_nncf_per_call_totals']['ci95']}).", "",
                  "| role | int8-ov ms | NNCF ms |", "|---|---|---|"]
        roles = list(dict.fromkeys([*ours["by_role_ms"], *theirs["by_role_ms"]]))
        lines += [f"| {k} | {ours['by_role_ms'].get(k, 0.0):.2f} | {theirs['by_role_ms'].get(k, 0.0):.2f} |"
                  for k in roles]
        lines += ["", "| OpenVINO layer type, runtime precision → output precision | int8-ov ms | NNCF ms |",
                  "|---|---|---|"]
        keys = list(dict.fromkeys([*ours["by_type_and_precision_ms"], *theirs["by_type_and_precision_ms"]]))
        lines += [f"| {k} | {ours['by_type_and_precision_ms'].get(k, 0.0):.2f} | "
                  f"{theirs['by_type_and_precision_ms'].get(k, 0.0):.2f} |" for k in keys]
        lines += ["", f"Bound on any graph form: with every non-convolution layer free, `int8-ov` would be "
                      f"**{b['if_every_other_layer_were_free']}×** NNCF. A {b['target']}× lead needs its other layers "
                      f"cut from {b['other_layers_ms']} ms to {b['other_layers_allowed_for_target_ms']} ms "
                      f"(−{b['cut_needed_pct']} %).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[50, 101])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ov-int8-profile"))
    args = ap.parse_args(argv)
    res = {}
    for d in args.depths:
        res[d] = profile_depth(d, args.batch, args.calls, args.work)
        print(f"SE-ResNet-{d}: totals {res[d]['engines'][INT8]['total_ms']} / {res[d]['engines'][NNCF]['total_ms']} "
              f"ms; bound {res[d]['bound']}", flush=True)
    out = write_results(__file__, {"batch": args.batch, "calls": args.calls,
                                   "depths": {str(d): r for d, r in res.items()}}, markdown(res, args))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
