"""sedeploy's CPU engines against OpenVINO FP32 and OpenVINO + NNCF INT8, side by side in one process.

For each SE-ResNet depth (built by `sedeploy build-engine --int8 --backend openvino`, random weights, calibrated
on the shipped sample images), these runners are timed interleaved (:func:`sedeploy.backends.timing.time_runners`:
round-robin, order rotated every round, one settle call before each timed call, GC paused), batch 1 and 8:

- ``ort-fp32`` / ``ort-int8-cpu``: ONNX Runtime on sedeploy's fused FP32 and its QOperator INT8 artifact;
- ``ov-fp32`` / ``ov-int8-ov`` / ``ov-int8-trt``: sedeploy's OpenVINO engines (IR) of the fused FP32, the
  ``int8-ov`` artifact (uint8-activation Q/DQ) and the TensorRT-rules Q/DQ artifact;
- ``ov-fp32-unfused``: OpenVINO reading the raw export (no SE fusion) — what the fusion buys inside OpenVINO;
- ``peer:openvino-fp32`` / ``peer:openvino-nncf-int8``: :mod:`sedeploy.bench.peers` (as `bench --peers`):
  OpenVINO reading the fused FP32 ONNX, and ``nncf.quantize`` with NNCF's defaults on the same calibration images.

Every OpenVINO runner uses the same settings (threads, LATENCY hint, f32 for non-quantized parts). The timer covers
one ``infer`` call, host numpy in → host numpy out. Speed-ups are medians of per-round ratios.

Accuracy: top-1 agreement with ORT FP32 on ``--image-limit`` real ImageNet validation images (random weights:
weak evidence, logits of an untrained net sit close together), and — the figure that decides — agreement and
top-1 on the 500 held-out images of the tiny *trained* SE-ResNet-18 (tests/tiny_trained.py).

Where the time goes: OpenVINO's per-layer counters (``PERF_COUNT``) and ONNX Runtime's profiler, median over
``--profile-runs`` calls per batch size, grouped by layer type and by SE role (the fused SE blocks' nodes are named
``…/squeeze``, ``…/fc1``, ``…/fc2``, ``…/gate``, ``…/scale``).

Usage::

    python benchmarks/experiments/openvino_peers.py --depths 50 101 --work /tmp/ov-peers \\
        --images ../shared/data/imagenet-val-1300/images --labels ../shared/data/imagenet-val-1300/labels.tsv

Writes benchmarks/results/openvino_peers/results.json, results.md and speedups.png.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH))  # benchmarks/common.py
sys.path.insert(0, str(BENCH.parent / "tests"))

from sedeploy.backends.openvino import OpenVinoModelRunner, OpenVinoRunner, build_engine  # noqa: E402
from sedeploy.backends.ort import OrtRunner  # noqa: E402
from sedeploy.bench.engines import describe_engine, preprocess_for  # noqa: E402
from sedeploy.bench.peers import PEER_FP32, PEER_NNCF, make_peers  # noqa: E402
from sedeploy.bench.report import machine_description  # noqa: E402
from sedeploy.backends.timing import paired_speedup, time_runners  # noqa: E402
from sedeploy.layout import Manifest  # noqa: E402
from sedeploy.build import BuildOptions, build_engines  # noqa: E402
from sedeploy.preprocess import find_images, load_batch  # noqa: E402

OUT = BENCH / "results" / "openvino_peers"
SE_ROLE = re.compile(r"/(squeeze|fc1|fc2|gate|scale)(?:\b|_)")
INT8_ROWS = ("ort-int8-cpu", "ov-int8-ov", "ov-int8-trt", "ov-int8-ov-sqfirst")


def build(out: Path, depth: int | None = None, model: Path | None = None, calib: Path | None = None) -> Path:
    """`build-engine --int8 --backend openvino` (once), plus sedeploy's OpenVINO engine of the int8-trt artifact."""
    if not Manifest.present(out):
        build_engines(model, out, BuildOptions.from_flat(int8=True, backend="openvino", calib=calib, progress=False,
                                                         depth=None if model is not None else depth or 50))
    trt = next(out.glob("*.int8-trt.onnx"))
    if not trt.with_name(trt.name.replace(".onnx", ".ov.xml")).is_file():
        build_engine(trt, out)
    build_sqfirst(out, calib)
    return out


def squeeze_first(fp32: Path, out: Path) -> Path:
    """Experiment (SE fusion form): pool the *input* of the expanding 1×1 conv and apply that conv to the pooled
    vector, instead of pooling its output. GAP(W·h + b) = W·GAP(h) + b exactly (a 1×1 conv is linear), but the
    squeeze now reads a tensor with 4× fewer channels (the bottleneck width). The fused SE squeeze is renamed
    ``…/squeeze`` and the new conv ``…/squeeze_expand``. Returns ``<stem>.sqfirst.fp32.onnx`` in ``out``."""
    from onnx import helper

    from sedeploy.onnxcore import Graph, image_input, load_onnx, run_model, save_onnx
    from sedeploy.preprocess import smooth_noise

    model = load_onnx(fp32)
    g = Graph(model)
    nodes, moved = [], 0
    for n in model.graph.node:
        nodes.append(n)
        conv = g.made_by(n.input[0], "Conv") if n.name.endswith("/squeeze") else None
        w = g.const(conv.input[1]) if conv is not None else None
        if n.op_type != "GlobalAveragePool" or w is None or w.shape[2:] != (1, 1) or len(conv.input) < 3:
            continue
        pooled = n.output[0]
        n.input[0], n.output[0] = conv.input[0], f"{pooled}_pre"
        nodes.append(helper.make_node("Conv", [f"{pooled}_pre", conv.input[1], conv.input[2]], [pooled],
                                      name=f"{n.name}_expand", kernel_shape=[1, 1]))
        moved += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = out / fp32.name.replace(".fp32.onnx", ".sqfirst.fp32.onnx")
    x = smooth_noise(2, image_input(model).height, seed=5)
    ref = run_model(fp32, x)
    diff = float(np.abs(run_model(model, x) - ref).max())
    if not diff <= 1e-4 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"squeeze-first rewrite changed the logits by {diff}")
    print(f"squeeze-first: {moved} SE squeezes moved before their expanding conv; max |Δlogit| {diff:.2g}")
    return save_onnx(model, path)


def build_sqfirst(out: Path, calib: Path | None) -> None:
    """The squeeze-first FP32 and its int8-ov artifact (same calibration folder), and their OpenVINO engines."""
    from sedeploy import quantize

    stem = min(out.glob("*.fp32.onnx")).name.removesuffix(".fp32.onnx")
    done = out / f"{stem}.sqfirst.int8-ov.ov.xml"
    if done.is_file():
        return
    fp32 = squeeze_first(out / f"{stem}.fp32.onnx", out)
    folder = calib or Path(Manifest.read(out).calibration["folder"])
    pp = preprocess_for(describe_engine(fp32))
    c = quantize.calibrate(fp32, folder, preprocess=pp, progress=False)
    q = out / f"{stem}.sqfirst.int8-ov.onnx"
    quantize.quantize_model(fp32, c, q, flavour="ov")
    build_engine(fp32, out)
    build_engine(q, out)


def runners_for(out: Path, raw: Path, threads: int) -> tuple[dict, dict]:
    stem = min(out.glob("*.fp32.onnx")).name.removesuffix(".fp32.onnx")
    f = lambda suffix: out / f"{stem}{suffix}"  # noqa: E731
    ref = describe_engine(f(".fp32.onnx"))
    r = {"ort-fp32": OrtRunner(f(".fp32.onnx"), threads=threads),
         "ort-int8-cpu": OrtRunner(f(".int8-cpu.onnx"), threads=threads),
         "ov-fp32": OpenVinoRunner(f(".fp32.ov.xml"), threads=threads),
         "ov-int8-ov": OpenVinoRunner(f(".int8-ov.ov.xml"), threads=threads),
         "ov-int8-trt": OpenVinoRunner(f(".int8-trt.ov.xml"), threads=threads),
         "ov-fp32-unfused": OpenVinoModelRunner(raw, precision="fp32", label="ov-fp32-unfused",
                                                threads=threads),
         "ov-fp32-sqfirst": OpenVinoRunner(f(".sqfirst.fp32.ov.xml"), threads=threads),
         "ov-int8-ov-sqfirst": OpenVinoRunner(f(".sqfirst.int8-ov.ov.xml"), threads=threads)}
    about = {}
    for peer in make_peers(ref, preprocess_for(ref), threads=threads):
        r[peer.spec.name] = peer.runner
        about[peer.spec.name] = peer.about
    return r, about


def logits(runner, x: np.ndarray, chunk: int = 8) -> np.ndarray:
    return np.concatenate([runner.infer(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def agreement(runners: dict, x: np.ndarray, labels: np.ndarray | None, ref: str) -> dict:
    out = {n: logits(r, x) for n, r in runners.items()}
    top = {n: o.argmax(1) for n, o in out.items()}
    return {n: {"agreement_pct": float((top[n] == top[ref]).mean() * 100),
                "top1_pct": float((top[n] == labels).mean() * 100) if labels is not None else None,
                "max_abs_logit_diff": float(np.abs(out[n] - out[ref]).max()), "images": int(len(x))}
            for n in out}


# ------------------------------------------------------------------------------------------- where time goes
def _group(layers: list[tuple[str, str, float]]) -> dict:
    by_type, by_role = defaultdict(float), defaultdict(float)
    for name, kind, us in layers:
        by_type[kind] += us
        m = SE_ROLE.search(name)
        by_role[f"SE {m.group(1)}" if m else "other"] += us
    total = sum(us for _, _, us in layers)
    se = sum(v for k, v in by_role.items() if k.startswith("SE"))
    return {"total_ms": total / 1e3, "se_ms": se / 1e3, "se_share_pct": 100 * se / total if total else None,
            "by_se_role_ms": {k: round(v / 1e3, 3) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
            "by_type_ms": {k: round(v / 1e3, 3) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:10]}}


def _median_layers(runs: list[list[tuple[str, str, float]]]) -> list[tuple[str, str, float]]:
    acc = defaultdict(list)
    for run in runs:
        for name, kind, us in run:
            acc[(name, kind)].append(us)
    return [(n, k, float(np.median(v))) for (n, k), v in acc.items()]


def ov_profile(source, precision: str, x: np.ndarray, threads: int, runs: int) -> dict:
    r = OpenVinoModelRunner(source, precision=precision, threads=threads, perf_counters=True)
    with r:
        for _ in range(3):
            r.infer(x)
        per = []
        for _ in range(runs):
            r.infer(x)
            per.append([(l["name"], f"{l['type']} [{l['exec_type']}]", l["real_us"]) for l in r.layer_times()])
    return _group(_median_layers(per))


def ort_profile(path: Path, x: np.ndarray, threads: int, runs: int) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "ort")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        for _ in range(3):
            s.run(None, {name: x})
        s.end_profiling()
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(3 + runs):
            s.run(None, {name: x})
        trace = json.loads(Path(s.end_profiling()).read_text())
    events = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run, current, seen = [], [], set()
    for e in events:  # a node's second appearance starts the next run
        node = e["name"].removesuffix("_kernel_time")
        if node in seen:
            per_run.append(current)
            current, seen = [], set()
        seen.add(node)
        current.append((node, e["args"].get("op_name", "?"), float(e["dur"])))
    per_run.append(current)
    return _group(_median_layers(per_run[-runs:]))


# ------------------------------------------------------------------------------------------- tiny trained model
def tiny_section(cache: Path, work: Path, threads: int) -> dict:
    from tiny_trained import tiny_trained

    art = tiny_trained(cache)
    out = build(work / "tiny", model=art.onnx_path, calib=art.calib_dir)
    r, about = runners_for(out, art.onnx_path, threads)
    for x in r.values():
        x.activate()
    try:
        acc = agreement(r, art.images, art.labels, "ort-fp32")
    finally:
        for x in r.values():
            x.deactivate()
    return {"model": "tiny trained SE-ResNet-18 (10 classes, 32 px)", "heldout_images": int(len(art.images)),
            "fp32_accuracy_at_training": art.accuracy, "rows": acc, "peers": about}


# ------------------------------------------------------------------------------------------- report
def speed_table(timing, names: list[str], batches, ref: str = "ort-fp32") -> dict:
    rows = {}
    for n in names:
        rows[n] = {}
        for b in batches:
            st = timing.stats(n, b)
            rows[n][b] = {"p50_ms": st["latency_ms"]["p50"], "iqr_pct": st["spread"]["iqr_pct"],
                          "img_s": st["throughput"], "n": st["n"],
                          "x_ort_fp32": paired_speedup(timing.samples[ref][b], timing.samples[n][b]),
                          "x_nncf": paired_speedup(timing.samples[PEER_NNCF][b], timing.samples[n][b]),
                          "x_ov_fp32_peer": paired_speedup(timing.samples[PEER_FP32][b], timing.samples[n][b])}
    return rows


def verdicts(model: dict, batches) -> list[str]:
    out = []
    speed, acc = model["speed"], model["accuracy_real_images"]
    for b in batches:
        best = max(INT8_ROWS, key=lambda n: speed[n][b]["x_nncf"])
        ratio = speed[best][b]["x_nncf"]
        out.append(f"batch {b}: fastest sedeploy INT8 is {best} at {ratio:.2f}× OpenVINO+NNCF INT8 "
                   f"(target ≥ 1.10: {'met' if ratio >= 1.1 else 'NOT met'}); sedeploy FP32 best "
                   f"{max(speed[n][b]['x_ov_fp32_peer'] for n in ('ort-fp32', 'ov-fp32', 'ov-fp32-sqfirst')):.2f}× "
                   f"OpenVINO FP32 (ov-fp32 = sedeploy's OpenVINO engine of its fused FP32)")
    return out


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# sedeploy CPU engines vs OpenVINO FP32 and OpenVINO + NNCF INT8 (same process, interleaved)", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_features'])}), {m['usable_cores']} usable cores, "
             f"load average at start {m['loadavg']}, at end {res['loadavg_end']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             f"Threads {res['config']['threads']}; warm-up {res['config']['warmup']}, {res['config']['repeats']} "
             "timed rounds per batch, settle 1; the timer covers one infer call, host numpy in → host numpy out. "
             "× columns are medians of per-round ratios (> 1: faster than the column's engine). The machine is "
             "shared: read the ratios, not the absolute times.", ""]
    for md in res["models"]:
        lines += [f"## {md['model']}", "", "| engine | batch | p50 ms | IQR % | img/s | × ORT FP32 | × OV+NNCF INT8 "
                  "| × OV FP32 peer | agreement % (vs ORT FP32, real images) |", "|---|---|---|---|---|---|---|---|---|"]
        for n, per in md["speed"].items():
            for b, s in per.items():
                a = md["accuracy_real_images"][n]["agreement_pct"]
                lines.append(f"| {n} | {b} | {s['p50_ms']:.1f} | {s['iqr_pct']:.0f} | {s['img_s']:.1f} | "
                             f"{s['x_ort_fp32']:.2f} | {s['x_nncf']:.2f} | {s['x_ov_fp32_peer']:.2f} | {a:.1f} |")
        lines += ["", f"Load average around this model's timing: {md['loadavg']}.", ""]
        lines += [f"- {v}" for v in md["verdicts"]] + [""]
        lines += ["### Where the time goes (median per-layer time of one call; SE = the fused SE blocks' nodes)", "",
                  "| engine | batch | total ms | SE ms | SE share % | SE by role (ms) | top layer types (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for key, p in md["profile"].items():
            n, b = key.rsplit("@b", 1)
            roles = ", ".join(f"{k} {v:.2f}" for k, v in p["by_se_role_ms"].items() if k != "other")
            types = ", ".join(f"{k} {v:.1f}" for k, v in list(p["by_type_ms"].items())[:4])
            lines.append(f"| {n} | {b} | {p['total_ms']:.1f} | {p['se_ms']:.1f} | {p['se_share_pct']:.0f} | "
                         f"{roles} | {types} |")
        lines += [""]
    t = res.get("tiny")
    if t:
        lines += [f"## Accuracy that decides: {t['model']}, {t['heldout_images']} held-out images", "",
                  "| engine | top-1 agreement with ORT FP32 % | top-1 % | max |Δlogit| |", "|---|---|---|---|"]
        for n, a in t["rows"].items():
            lines.append(f"| {n} | {a['agreement_pct']:.1f} | {a['top1_pct']:.1f} | {a['max_abs_logit_diff']:.2f} |")
        lines += [""]
    lines += ["## Peers", ""] + [f"- {k}: {v}" for k, v in res["peers"].items()] + [""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = res["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, md in zip(axes[0], models):
        names = list(md["speed"])
        batches = list(next(iter(md["speed"].values())))
        width = 0.8 / len(batches)
        for i, b in enumerate(batches):
            vals = [md["speed"][n][b]["x_nncf"] for n in names]
            ax.barh(np.arange(len(names)) + i * width, vals, height=width, label=f"batch {b}")
        ax.axvline(1.0, color="k", lw=1)
        ax.axvline(1.1, color="r", lw=1, ls="--", label="target 1.1× NNCF")
        ax.set_yticks(np.arange(len(names)) + width * (len(batches) - 1) / 2, names)
        ax.invert_yaxis()
        ax.set_xlabel("speed relative to OpenVINO + NNCF INT8 (same run; > 1 = faster)")
        ax.set_title(f"SE-ResNet-{md['depth']}, load average {md['loadavg'][0]}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[50])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-ov-peers")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path)
    p.add_argument("--image-limit", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile-runs", type=int, default=5)
    p.add_argument("--tiny-cache", type=Path, help="tests/tiny_trained.py cache folder (trains once if empty)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)

    res = {"command": "python benchmarks/experiments/openvino_peers.py "
                      + " ".join(map(shlex.quote, argv or sys.argv[1:])),
           "machine": machine_description(),
           "config": {"threads": a.threads, "batches": a.batches, "warmup": a.warmup, "repeats": a.repeats,
                      "image_limit": a.image_limit, "settle": 1, "profile_runs": a.profile_runs},
           "models": [], "peers": {}}
    found = find_images(a.images)
    paths = found.paths[: a.image_limit]
    label_of = {}
    if a.labels:
        for line in a.labels.read_text().splitlines():
            f, _, idx = line.partition("\t")
            label_of[f] = int(idx)
    for depth in a.depths:
        t0 = time.time()
        out = build(a.work / f"se{depth}", depth=depth)
        raw = Path(Manifest.read(out).data["source"])
        r, about = runners_for(out, raw, a.threads)
        res["peers"].update(about)
        for x in r.values():
            x.activate()
        pp = preprocess_for(describe_engine(min(out.glob("*.fp32.onnx"))))
        x, loaded = load_batch(paths, pp, what="benchmark images")
        labels = (np.array([label_of.get(q.relative_to(found.root).as_posix(), -1) for q in loaded])
                  if label_of else None)
        load0 = os.getloadavg()
        timing = time_runners(r, x, batch_sizes=a.batches, warmup=a.warmup, repeats=a.repeats, settle=1)
        load1 = os.getloadavg()
        acc = agreement(r, x, labels, "ort-fp32")
        for n in r.values():
            n.deactivate()
        stem = min(out.glob("*.fp32.onnx")).name.removesuffix(".fp32.onnx")
        prof = {}
        for b in a.batches:
            xb = x[:b]
            prof[f"ort-fp32@b{b}"] = ort_profile(out / f"{stem}.fp32.onnx", xb, a.threads, a.profile_runs)
            prof[f"ort-int8-cpu@b{b}"] = ort_profile(out / f"{stem}.int8-cpu.onnx", xb, a.threads, a.profile_runs)
            prof[f"ov-fp32@b{b}"] = ov_profile(out / f"{stem}.fp32.ov.xml", "fp32", xb, a.threads, a.profile_runs)
            prof[f"ov-int8-ov@b{b}"] = ov_profile(out / f"{stem}.int8-ov.ov.xml", "int8", xb, a.threads,
                                                  a.profile_runs)
            prof[f"ov-int8-ov-sqfirst@b{b}"] = ov_profile(out / f"{stem}.sqfirst.int8-ov.ov.xml", "int8", xb,
                                                          a.threads, a.profile_runs)
            prof[f"{PEER_NNCF}@b{b}"] = ov_profile(r[PEER_NNCF].source, "int8", xb, a.threads, a.profile_runs)
        md = {"model": f"SE-ResNet-{depth} (random weights, {len(x)} real images)", "depth": depth,
              "build_dir": str(out), "speed": speed_table(timing, list(r), a.batches),
              "accuracy_real_images": acc, "loadavg": [round(v, 2) for v in (*load0[:1], *load1[:1])],
              "timing": timing.as_dict(), "profile": prof, "seconds": round(time.time() - t0, 1)}
        md["verdicts"] = verdicts(md, a.batches)
        res["models"].append(md)
        print("\n".join(md["verdicts"]), flush=True)
        write(res, a.out)  # after every model: a long run interrupted later keeps what it measured
    if a.tiny_cache:
        res["tiny"] = tiny_section(a.tiny_cache, a.work, a.threads)
    write(res, a.out)
    print(f"wrote {a.out}/results.json, results.md, speedups.png")
    return 0


def write(res: dict, out: Path) -> None:
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / "results.md").write_text(to_markdown(res))
    plot(res, out / "speedups.png")


if __name__ == "__main__":
    sys.exit(main())
