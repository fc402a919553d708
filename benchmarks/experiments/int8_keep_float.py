"""Does keeping a few layers in float lift INT8 top-1 agreement to 99 %? (trained reference, CPU flavour)

Quantizes the trained reference SE-ResNet-50 (112 px, benchmarks/train_reference.py, exported by
`benchmarks/headline.py --stages drift` to ~/.cache/sedeploy/headline/reference-112.onnx) with the CPU flavour
while leaving chosen nodes in FP32 — the stem conv, the classifier, the last stage (layer4 from its first conv to
the end, which includes the classifier) — and measures top-1 agreement with FP32 on all 3,925 Imagenette val
images. The nodes are named through ``quantize_model(exclude=...)`` (the hook the accuracy-budgeted fallback of
:mod:`sedeploy.int8_budget` uses). Calibration: percentile on 512 Imagenette train images (cached). Writes benchmarks/results/int8_keep_float/results.json.

    python benchmarks/experiments/int8_keep_float.py      # ≈ 6 min on 2 cores
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

import sedeploy.quantize as Q
from sedeploy.backends.ort import OrtRunner
from sedeploy.labels import resolve_labels
from sedeploy.quantize import calibrate
from sedeploy.preprocess import Preprocess, find_images, load_batch

BENCH = Path(__file__).resolve().parents[1]  # benchmarks/ (this script lives in benchmarks/experiments/)
sys.path.insert(0, str(BENCH))  # benchmarks/common.py
DATA = BENCH.parent.parent / "shared" / "data"
MODEL = Path.home() / ".cache" / "sedeploy" / "headline" / "reference-112.onnx"
TMP = Path(tempfile.gettempdir())


def variants(model) -> dict[str, set[str]]:
    """Node names kept in FP32 per variant. SE-ResNet-50's last 17 Conv/Gemm nodes are layer4 (3 blocks × 3
    convs + 2 SE FCs each, 1 downsample conv) and the classifier, so the 17th from the end starts layer4."""
    weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    order = [n.name for n in model.graph.node]
    tail = set(order[order.index(weighted[-17]):])
    stem, head = weighted[0], weighted[-1]
    return {"none": set(), "stem": {stem}, "head": {head}, "stem+head": {stem, head},
            "last stage+head": tail, "stem+last stage+head": {stem} | tail}


def main() -> None:
    pp = Preprocess.for_size(112)
    cal = calibrate(MODEL, DATA / "imagenette" / "train", count=512, cache_dir=TMP / "sedeploy-int8forms-cache",
                    progress=False, preprocess=pp)
    val = DATA / "imagenette" / "val"
    x, loaded = load_batch(list(find_images(val).paths), pp)
    labels = resolve_labels(loaded, val, num_classes=10).indices

    def logits(path) -> np.ndarray:
        with OrtRunner(path, threads=2) as runner:
            return np.concatenate([runner.infer(x[i:i + 64]) for i in range(0, len(x), 64)])

    ref = logits(MODEL)
    out = {}
    for name, keep in variants(onnx.load(str(MODEL))).items():
        path = TMP / f"sedeploy-keep-float-{name.replace('+', '_').replace(' ', '_')}.onnx"
        Q.quantize_model(MODEL, cal, path, flavour="cpu", se="int8", exclude=set(keep))
        got = logits(path)
        out[name] = {"excluded_nodes": len(keep), "agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                     "top1": float((got.argmax(1) == labels).mean()),
                     "mean_abs_dlogit": float(np.abs(got - ref).mean())}
        print(name, out[name], flush=True)
    print("fp32 top1", float((ref.argmax(1) == labels).mean()))
    from common import write_results  # noqa: E402  (benchmarks/common.py)

    print("wrote", write_results(__file__, out))


if __name__ == "__main__":
    main()
