"""Does the order in which two OpenVINO models are compiled bias a side-by-side timing? (It does, by a few %.)

Every comparison sedeploy reports pairs calls round by round, so slow drifts of the machine cancel, and
:func:`sedeploy.backends.timing.speedup_interval` bounds the round-to-round noise. Neither covers an effect that is
fixed for the life of one compiled model (where its weights and buffers landed in memory, what it shares caches
with). This script measures one: sedeploy's ``int8-ov`` artifact and OpenVINO + NNCF INT8 of the same FP32 model
(random-weight SE-ResNet-50, 224 px, batch 8, built by ``sedeploy build-engine --depth 50 --int8``; NNCF's default
preset on the same calibration images), compiled anew in each trial, in alternating order (int8-ov first, then NNCF
first, …), each trial timing ``--calls`` alternating calls (order swapped every call; the timer covers one
synchronous ``infer``, host numpy in → out), with and without per-layer performance counters.

    python benchmarks/experiments/ov_compile_order.py [--trials 4] [--calls 20] [--work /tmp/ov-int8-profile]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from common import write_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ov-int8-profile"))
    args = ap.parse_args(argv)

    import openvino as ov

    from sedeploy.backends.openvino_support import compile_config
    from sedeploy.bench.peers import nncf_int8, peer_calibration
    from sedeploy.backends.timing import paired_speedup, speedup_interval
    from sedeploy.preprocess import Preprocess

    engines = args.work / "se-resnet50" / "engines"
    engines.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "sedeploy", "build-engine", "--depth", "50", "--int8", "-o", str(engines)],
                   check=True, cwd=engines.parent)
    fp32, int8 = next(engines.glob("*.fp32.onnx")), next(engines.glob("*.int8-ov.onnx"))
    images, how = peer_calibration(fp32, Preprocess.for_size(224))
    core = ov.Core()
    nncf_model = nncf_int8(fp32, images, how)
    x = np.resize(images, (8, *images.shape[1:])).astype(np.float32)
    rows = []
    for perf in (False, True):
        cfg = compile_config(threads=2, precision_hint="f32", perf_counters=perf)
        for trial in range(args.trials):
            names = ["int8-ov", "nncf"] if trial % 2 == 0 else ["nncf", "int8-ov"]
            source = {"int8-ov": lambda: core.read_model(str(int8)), "nncf": lambda: nncf_model}
            requests = {n: core.compile_model(source[n](), "CPU", cfg).create_infer_request() for n in names}
            for n in names:
                for _ in range(3):
                    requests[n].infer({0: x})
            t = {n: [] for n in names}
            for k in range(args.calls):
                for n in (names if k % 2 == 0 else names[::-1]):
                    t0 = time.perf_counter()
                    requests[n].infer({0: x})
                    t[n].append(time.perf_counter() - t0)
            ci = speedup_interval(t["nncf"], t["int8-ov"])
            rows.append({"perf_counters": perf, "compiled_first": names[0],
                         "x_nncf": round(paired_speedup(t["nncf"], t["int8-ov"]), 3),
                         "ci95": [round(v, 3) for v in ci] if ci else None})
            print(rows[-1], flush=True)
            del requests
    lines = ["# Compile order and a side-by-side OpenVINO timing: `int8-ov` × NNCF INT8, SE-ResNet-50, batch 8", "",
             f"Each trial compiles both models anew, in the order given, then times {args.calls} alternating calls "
             "(order swapped every call). × NNCF: median of per-call NNCF time / int8-ov time (> 1: int8-ov faster), "
             f"95 % sign-test interval. Calibration: {how}.", "",
             "| trial | perf counters | compiled first | × NNCF | 95 % interval |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {'on' if r['perf_counters'] else 'off'} | {r['compiled_first']} | {r['x_nncf']} | "
                     f"{r['ci95']} |")
    for perf in (False, True):
        by = {f: [r["x_nncf"] for r in rows if r["perf_counters"] == perf and r["compiled_first"] == f]
              for f in ("int8-ov", "nncf")}
        lines.append("")
        lines.append(f"Counters {'on' if perf else 'off'}: mean × NNCF {np.mean(by['int8-ov']):.3f} with int8-ov "
                     f"compiled first, {np.mean(by['nncf']):.3f} with NNCF first.")
    write_results(__file__, {"calls": args.calls, "trials": rows, "calibration": how}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
