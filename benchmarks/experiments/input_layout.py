"""NHWC classifiers: run the graph as exported (NHWC input) or give it an NCHW input? Timed on ONNX Runtime and
OpenVINO, interleaved (every round runs every form, paired per-round ratios), at batch 1.

Forms of one NHWC model (e.g. tf2onnx's default export, input 1×224×224×3):

- ``nhwc``: the file as exported, fed an NHWC batch (engine time only);
- ``nhwc+host``: the same, fed from sedeploy's pipeline, whose batches are N×3×H×W: the transpose to NHWC is
  timed too (what bench/serving pay for an NHWC engine);
- ``nchw``: sedeploy's form (:func:`sedeploy.onnxcore.nchw_input`: the converter's leading NHWC→NCHW Transpose
  dropped, the input feeds the first layer);
- ``nchw+T``: the NHWC graph with one Transpose (NCHW→NHWC) added in front (what :func:`nchw_input` does when the
  graph does not start with the converter's Transpose).

    python benchmarks/experiments/input_layout.py ../shared/data/models/mobilenet_v1_0.25_224_tf2onnx.onnx --threads 1 --rounds 200
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]  # this script lives in benchmarks/experiments/
sys.path.insert(0, str(REPO))


def _added_transpose(proto):
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    old = m.graph.input[0]
    n, h, w, c = [d.dim_value or d.dim_param for d in old.type.tensor_type.shape.dim]
    new = helper.make_tensor_value_info(old.name + "_nchw", old.type.tensor_type.elem_type, [n, c, h, w])
    m.graph.node.insert(0, helper.make_node("Transpose", [new.name], [old.name], perm=[0, 2, 3, 1]))
    del m.graph.input[:]
    m.graph.input.append(new)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="an NHWC ONNX classifier with a fixed input size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per form and round")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import openvino as ov

    from sedeploy.onnxcore import image_input, load_onnx, nchw_input

    src = load_onnx(args.model)
    inp = image_input(src)
    if inp.layout != "NHWC":
        sys.exit(f"{args.model} is not an NHWC model (input {inp.shape})")
    tmp = Path(tempfile.mkdtemp(prefix="input-layout-"))
    files = {"nhwc": args.model}
    ours, how = nchw_input(src)
    onnx.save(ours, str(tmp / "nchw.onnx"))
    onnx.save(_added_transpose(src), str(tmp / "nchw_t.onnx"))
    files["nchw"], files["nchw+T"] = tmp / "nchw.onnx", tmp / "nchw_t.onnx"
    batch = inp.static_batch or 1
    x = np.random.default_rng(0).standard_normal((batch, 3, inp.height, inp.width)).astype(np.float32)
    xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}

    def ort_call(path, feed_nhwc_from_nchw=False):
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        if feed_nhwc_from_nchw:
            return lambda: s.run(None, {name: np.ascontiguousarray(x.transpose(0, 2, 3, 1))})[0]
        a = xh if path == args.model else x
        return lambda: s.run(None, {name: a})[0]

    def ov_call(path, feed_nhwc_from_nchw=False):
        c = core.compile_model(str(path), "CPU", cfg)
        if feed_nhwc_from_nchw:
            return lambda: c(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))[0]
        a = xh if path == args.model else x
        return lambda: c(a)[0]

    forms = {}
    for be, make in (("ort", ort_call), ("openvino", ov_call)):
        forms[f"{be}/nhwc"] = make(files["nhwc"])
        forms[f"{be}/nhwc+host"] = make(files["nhwc"], True)
        forms[f"{be}/nchw"] = make(files["nchw"])
        forms[f"{be}/nchw+T"] = make(files["nchw+T"])
    ref = forms["ort/nhwc"]()
    for k, f in forms.items():
        assert np.allclose(f(), ref, atol=1e-4), k
        for _ in range(20):
            f()
    times = {k: [] for k in forms}
    order = list(forms)
    for r in range(args.rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotated order inside each round
            f = forms[k]
            for _ in range(3):
                f()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                f()
            times[k].append((time.perf_counter() - t0) / args.calls * 1e3)
    print(f"{args.model.name}: input {inp.shape}; sedeploy's NCHW form: {how}")
    print(f"{args.threads} thread(s), batch {batch}, {args.rounds} interleaved rounds × {args.calls} calls\n")
    print("| form | median ms | IQR ms | vs nhwc (paired median ratio, > 1: faster) | rounds faster |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        be = k.split("/")[0]
        q = np.percentile(v, [25, 50, 75])
        r = np.array(times[f"{be}/nhwc"]) / np.array(v)
        print(f"| {k} | {q[1]:.3f} | {q[0]:.3f}–{q[2]:.3f} | {np.median(r):.3f} | {np.mean(r > 1):.0%} |")


if __name__ == "__main__":
    main()
