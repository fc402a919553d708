"""Which fused SE form should the pass emit? Measure every candidate on SE-ResNet-50 with ONNX Runtime CPU.

For the unfused export and each form: top-level node count, the graph ORT actually runs at ORT_ENABLE_ALL
(ReorderInput / ReorderOutput / NCHWc node counts) and interleaved throughput at batch 1 and 8 with 2 threads,
as per-round ratios against the unfused model (robust to a machine that is busy with other work). An extra
probe form, "expand" (the standard form with the gate Expand-ed to x's full shape so that the scale Mul has two
equal-shape operands), tests whether ORT's NCHWc Mul can then take the scale; it is not offered by the pass.

    python benchmarks/experiments/se_fusion_forms.py [--depth 50] [--size 224] [--seconds 60]

Writes benchmarks/results/se_fusion_forms/results.json and .md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from sedeploy.backends.ort import OrtRunner, optimized_graph_histogram
from sedeploy.backends.timing import paired_speedup, time_runners
from sedeploy.export import export_onnx
from sedeploy.model import build_model
from sedeploy.passes import DEFAULT_FORM, FORMS, fuse_se_blocks

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH))  # benchmarks/common.py


def expand_probe(standard: onnx.ModelProto) -> onnx.ModelProto:
    """Standard form + Expand(gate, Shape(x)) before every SE scale Mul (equal-shape Mul operands)."""
    m = onnx.ModelProto()
    m.CopyFrom(standard)
    producers = {o: n for n in m.graph.node for o in n.output}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Mul" and producers.get(n.input[1]) is not None and \
                producers[n.input[1]].op_type in ("Sigmoid", "HardSigmoid"):
            x, g = n.input[0], n.input[1]
            nodes.append(helper.make_node("Shape", [x], [g + "_xshape"], name=n.name + "/shape"))
            nodes.append(helper.make_node("Expand", [g, g + "_xshape"], [g + "_full"], name=n.name + "/expand"))
            n.input[1] = g + "_full"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=60.0, help="timing budget per batch size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="se-forms-") as tmp:
        tmp = Path(tmp)
        src = tmp / "unfused.onnx"
        export_onnx(build_model(args.depth, seed=1), src, input_size=args.size)
        source = onnx.load(str(src))
        models = {"unfused": source}
        reports = {}
        for form in FORMS:
            models[form], rep = fuse_se_blocks(source, form=form)
            reports[form] = rep.as_dict()
        models["expand (probe)"] = expand_probe(models["standard"])
        x = np.random.default_rng(0).standard_normal((8, 3, args.size, args.size)).astype(np.float32)
        rows, runners, ref = {}, {}, None
        for name, model in models.items():
            path = tmp / (name.split()[0] + ".onnx")
            onnx.save(model, str(path))
            hist = optimized_graph_histogram(path, "all", threads=1)
            runners[name] = OrtRunner(path, threads=args.threads).activate()
            out = runners[name].infer(x[:2])
            ref = out if ref is None else ref
            rows[name] = {"nodes": len(model.graph.node),
                          "reorder_input": hist.get("com.microsoft.nchwc:ReorderInput", 0),
                          "reorder_output": hist.get("com.microsoft.nchwc:ReorderOutput", 0),
                          "nchwc_nodes": sum(v for k, v in hist.items() if k.startswith("com.microsoft.nchwc:")),
                          "ort_nodes": sum(hist.values()),
                          "max_abs_diff_vs_unfused": float(np.abs(out - ref).max()),
                          "ort_histogram": hist}
        timing = time_runners(runners, x, batch_sizes=(1, 8), warmup=2, repeats=200, min_repeats=5,
                              max_seconds=args.seconds)
        for name in rows:
            for b in (1, 8):
                st = timing.stats(name, b)
                rows[name][f"throughput_b{b}"] = round(st["throughput"], 2) if st else None
                rows[name][f"ratio_vs_unfused_b{b}"] = round(paired_speedup(
                    timing.samples["unfused"][b], timing.samples[name][b]), 3)
                rows[name][f"rounds_b{b}"] = len(timing.samples[name][b])
    result = {"model": f"SE-ResNet-{args.depth} (random weights, seed 1), dynamo opset 18 export, {args.size}px",
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "default_form": DEFAULT_FORM, "fusion_reports": reports, "forms": rows,
              "note": ("Throughput measured interleaved (rotating order) while a CPU training job ran on the same "
                       "2-core machine: absolute img/s are depressed and noisy; only the per-round ratios against "
                       "'unfused' are meaningful, and differences within ~±5% are noise.")}
    lines = [f"# SE fusion forms — {result['model']}", "",
             f"ONNX Runtime CPU, ORT_ENABLE_ALL, {args.threads} threads. {result['note']}", "",
             "| form | nodes | ORT ReorderInput | ORT ReorderOutput | NCHWc nodes | max abs Δlogit | img/s b1 | "
             "ratio b1 | img/s b8 | ratio b8 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['nodes']} | {r['reorder_input']} | {r['reorder_output']} | {r['nchwc_nodes']} | "
                     f"{r['max_abs_diff_vs_unfused']:.2g} | {r['throughput_b1']} | {r['ratio_vs_unfused_b1']} | "
                     f"{r['throughput_b8']} | {r['ratio_vs_unfused_b8']} |")
    lines += ["", f"Default form: `{DEFAULT_FORM}` (see sedeploy/passes/se_fusion.py for the reasoning).", ""]
    from common import write_results  # noqa: E402  (benchmarks/common.py)

    write_results(__file__, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
