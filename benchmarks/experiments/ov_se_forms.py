"""SE forms of the OpenVINO INT8 artifact against OpenVINO + NNCF INT8, interleaved, with per-layer profiles.

What sedeploy controls to get ahead of NNCF: the SE fusion form and the Q/DQ placement around
SE. Every form below is built from one FP32 SE-ResNet (random weights; speed does not depend on them) and one
calibration (the shipped ``calib/`` photos, which the NNCF peer also calibrates on), written by
:func:`sedeploy.quantize.quantize_model` (``flavour="ov"``) and compiled by sedeploy's OpenVINO backend:

- ``se-int8``: the ``int8-ov`` default so far — every SE op quantized (squeeze output, both FCs, gate);
- ``se-fc-float``: NNCF's SE placement — the squeeze reads the int8 conv output, the FCs and the Sigmoid run in
  float, only the gate output and the scale Multiply are quantized;
- ``sqfirst-…``: the same two placements on the *squeeze-first* graph: the expanding 1×1 conv (conv3 + folded BN,
  linear) commutes with the spatial mean, so the squeeze pools conv3's *input* (a quarter of the channels) and
  applies conv3's weights to the pooled vector (``benchmarks/openvino_peers.squeeze_first``; same logits within
  1e-4 relative).

Timed interleaved with OpenVINO FP32 and OpenVINO + NNCF INT8 (:mod:`sedeploy.bench.peers`, NNCF defaults) at batch
1 and 8 (:func:`sedeploy.backends.timing.time_runners`: round-robin, rotated order, one settle call before each timed
call); the timer covers one synchronous ``infer`` (host numpy in → out). Speed-ups: medians of per-round ratios.
Where the time goes: OpenVINO's per-layer counters, grouped by SE role. Accuracy: top-1 agreement with the FP32
engine on the tiny *trained* SE-ResNet-18 (500 held-out images; its basic blocks have no expanding 1×1 conv, so
the squeeze-first rows equal their plain rows there) and on SE-ResNet-50 with random weights on real images.

    python benchmarks/experiments/ov_se_forms.py --images ../shared/data/imagenet-val-1300/images
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

PLACEMENTS = ("se-int8", "se-fc-float")


def se_exclusions(fp32: Path, placement: str) -> frozenset[str]:
    """Node names kept float for ``placement``: nothing, or every SE block's squeeze, FCs and gate (NNCF's form).
    The squeeze-first graph is matched by the names the fusion gave its SE nodes (``…/squeeze``, ``…/fc1``,
    ``…/fc2``, ``…/gate``, the ReLU between the FCs, and the moved ``…/squeeze_expand`` conv): the SE recogniser
    does not see a block whose squeeze pools another tensor than the one it scales."""
    import re

    from sedeploy.onnxcore import load_onnx

    if placement == "se-int8":
        return frozenset()
    role = re.compile(r"/(squeeze|squeeze_expand|fc1|fc2|gate|Relu)$")
    return frozenset(n.name for n in load_onnx(fp32).graph.node if role.search(n.name))


def build_forms(fp32: Path, cal, out: Path, *, sqfirst_fp32: Path | None = None) -> dict[str, Path]:
    """OpenVINO engines (IR paths) of every form; ``cal`` must be a calibration of ``fp32`` (and, for the
    squeeze-first graph, a second calibration is made on it: its squeeze tensors are new)."""
    from sedeploy.backends import EngineOptions
    from sedeploy.backends.openvino import build_engine
    from sedeploy.quantize import calibrate
    from sedeploy.quantize import quantize_model

    sources = {"": (fp32, cal)}
    if sqfirst_fp32 is not None:
        sources["sqfirst-"] = (sqfirst_fp32, calibrate(sqfirst_fp32, BENCH.parent / "calib", progress=False))
    engines = {}
    for prefix, (src, c) in sources.items():
        for placement in PLACEMENTS:
            name = prefix + placement
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            art = folder / f"{src.name.removesuffix('.onnx').removesuffix('.fp32')}.int8-ov.onnx"
            quantize_model(src, c, art, flavour="ov", exclude=se_exclusions(src, placement))
            engines[name] = build_engine(art, folder, EngineOptions(threads=2)).path
    return engines


def _logits(runner, x, batch=50):
    return np.concatenate([runner.infer(x[i:i + batch]) for i in range(0, len(x), batch)])


def _agree(a, b) -> float:
    return round(100 * float((a.argmax(1) == b.argmax(1)).mean()), 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True, help="real images for SE-ResNet-50 agreement")
    ap.add_argument("--image-limit", type=int, default=300)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-ov-se-forms")
    ap.add_argument("--tiny-cache", type=Path, default=Path(tempfile.gettempdir()) / "sedeploy-tiny-cache")
    args = ap.parse_args(argv)

    from openvino_peers import ov_profile, squeeze_first

    from common import write_results
    from sedeploy.backends import EngineOptions
    from sedeploy.backends.openvino import OpenVinoRunner, build_engine
    from sedeploy.bench.engines import describe_engine
    from sedeploy.bench.peers import PEER_NNCF, make_peers
    from sedeploy.backends.timing import paired_speedup, time_runners
    from sedeploy.quantize import calibrate
    from sedeploy.export import export_onnx
    from sedeploy.model import build_model
    from sedeploy.onnxcore import load_onnx, save_onnx
    from sedeploy.passes import fuse_se_blocks
    from sedeploy.preprocess import Preprocess, find_images, load_batch
    from tiny_trained import tiny_trained

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    calib = BENCH.parent / "calib"
    res: dict = {"forms": ["sedeploy OpenVINO FP32", *PLACEMENTS, *(f"sqfirst-{p}" for p in PLACEMENTS),
                           "peer:openvino-fp32", PEER_NNCF],
                 "calibration": f"percentile (sedeploy default) on the {calib.name}/ photos (27); NNCF on the same"}

    # accuracy on the tiny trained network (no expanding 1x1 conv: only the plain placements apply)
    art = tiny_trained(args.tiny_cache)
    (work / "tiny").mkdir(exist_ok=True)
    tiny_fp32 = save_onnx(fuse_se_blocks(load_onnx(art.onnx_path))[0], work / "tiny" / "tiny.fp32.onnx")
    tcal = calibrate(tiny_fp32, art.calib_dir, progress=False, preprocess=art.preprocess)
    tiny = build_forms(tiny_fp32, tcal, work / "tiny")
    with OpenVinoRunner(build_engine(tiny_fp32, work / "tiny", EngineOptions(threads=2)).path, threads=2) as r:
        ref = _logits(r, art.images, 100)
    res["agreement_tiny_trained_pct"] = {}
    for name, path in tiny.items():
        with OpenVinoRunner(path, threads=2) as r:
            res["agreement_tiny_trained_pct"][name] = _agree(_logits(r, art.images, 100), ref)

    # SE-ResNet-50 (or --depth): every form, interleaved with the peers
    stem = f"se-resnet{args.depth}"
    fp32 = work / f"{stem}.fp32.onnx"
    if not fp32.is_file():
        raw = export_onnx(build_model(args.depth, seed=0), work / f"{stem}.onnx", input_size=224)
        fused, _ = fuse_se_blocks(load_onnx(raw))
        save_onnx(fused, fp32)
    sq = work / f"{stem}.sqfirst.fp32.onnx"
    if not sq.is_file():
        sq = squeeze_first(fp32, work)
    cal = calibrate(fp32, calib, progress=False)
    engines = build_forms(fp32, cal, work / stem, sqfirst_fp32=sq)
    fp32_engine = build_engine(fp32, work / stem, EngineOptions(threads=2)).path
    x, _ = load_batch(find_images(args.images).paths[: args.image_limit], Preprocess())
    runners = {"sedeploy OpenVINO FP32": OpenVinoRunner(fp32_engine, threads=2).activate()}
    runners.update({n: OpenVinoRunner(p, threads=2).activate() for n, p in engines.items()})
    peers = make_peers(describe_engine(fp32_engine), Preprocess(), threads=2, calib=calib)
    for peer in peers:
        runners[peer.spec.name] = peer.runner.activate()
    ref = _logits(runners["sedeploy OpenVINO FP32"], x)
    res["agreement_random_weights_pct"] = {n: _agree(_logits(r, x), ref) for n, r in runners.items()}
    t = time_runners(runners, x[:8], batch_sizes=(1, 8), warmup=3, repeats=args.repeats, settle=1)
    res["speed"] = {str(b): {n: {"img_s": round(b / float(np.median(t.samples[n][b])), 1),
                                 "iqr_pct": t.stats(n, b)["spread"]["iqr_pct"],
                                 "x_nncf": round(paired_speedup(t.samples[PEER_NNCF][b], t.samples[n][b]), 3)}
                             for n in runners} for b in (1, 8)}
    res["timer"] = "one synchronous infer call, host numpy in → host numpy out; interleaved, settle 1"
    for r in runners.values():
        r.deactivate()
    res["profile"] = {}
    sources = {"se-int8": (engines["se-int8"], "int8"), "se-fc-float": (engines["se-fc-float"], "int8"),
               "sqfirst-se-fc-float": (engines["sqfirst-se-fc-float"], "int8"),
               "sqfirst-se-int8": (engines["sqfirst-se-int8"], "int8")}
    nncf_model = next(p for p in peers if p.spec.name == PEER_NNCF).runner.source
    for b in (1, 8):
        for name, (src, prec) in sources.items():
            res["profile"][f"{name} b{b}"] = ov_profile(Path(src), prec, x[:b], 2, args.profile_runs)
        res["profile"][f"{PEER_NNCF} b{b}"] = ov_profile(nncf_model, "int8", x[:b], 2, args.profile_runs)

    lines = [f"# SE forms of the OpenVINO INT8 artifact — SE-ResNet-{args.depth}", "",
             f"Interleaved in one process with OpenVINO FP32 and OpenVINO + NNCF INT8 (2 threads, {args.repeats} "
             "rounds, settle 1, random weights). × NNCF: median of per-round ratios. Timer: " + res["timer"] + ".",
             "", "| form | b1 img/s | b1 × NNCF | b8 img/s | b8 × NNCF | agreement SE-50 random (real images) | "
             "agreement tiny trained |", "|---|---|---|---|---|---|---|"]
    for n in runners:
        s1, s8 = res["speed"]["1"][n], res["speed"]["8"]
        tiny_a = res["agreement_tiny_trained_pct"].get(n.removeprefix("sqfirst-"), "")
        lines.append(f"| {n} | {s1['img_s']} | {s1['x_nncf']} | {s8[n]['img_s']} | {s8[n]['x_nncf']} | "
                     f"{res['agreement_random_weights_pct'][n]} % | {f'{tiny_a} %' if tiny_a != '' else '—'} |")
    lines += ["", "## Where the time goes (OpenVINO per-layer counters, median of "
              f"{args.profile_runs} calls, ms)", "", "| form | batch | total | SE share | by SE role | top layer types |",
              "|---|---|---|---|---|---|"]
    for key, p in res["profile"].items():
        name, b = key.rsplit(" b", 1)
        roles = ", ".join(f"{k} {v:.2f}" for k, v in p["by_se_role_ms"].items() if k != "other")
        types = ", ".join(f"{k} {v:.1f}" for k, v in list(p["by_type_ms"].items())[:4])
        lines.append(f"| {name} | {b} | {p['total_ms']:.1f} | {p['se_share_pct']:.0f} % | {roles} | {types} |")
    print("\n".join(lines))
    write_results(__file__, res, "\n".join(lines), argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
