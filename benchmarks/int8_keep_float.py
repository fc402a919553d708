"""Does keeping a few layers in float lift INT8 top-1 agreement to 99 %? (trained reference, CPU flavour)

Quantizes the trained reference SE-ResNet-50 (112 px, benchmarks/train_reference.py, exported with
`sedeploy export --checkpoint … --input-size 112`) with the CPU flavour while leaving chosen nodes in FP32 — the
stem conv, the classifier, the last stage — and measures top-1 agreement with FP32 on all 3,925 Imagenette val
images. It reuses quantize's SE-exclusion hook (``_se_nodes``) to name the nodes to exclude: an experiment, not
a product option. Calibration: percentile on 512 Imagenette train images (cached). Writes int8_keep_float.json.

    python benchmarks/int8_keep_float.py      # ≈ 6 min on 2 cores
"""
import json
import tempfile

import numpy as np
import onnx
from pathlib import Path
import sedeploy.quantize as Q
from sedeploy.calibration import calibrate
from sedeploy.preprocess import Preprocess, find_images, load_batch
from sedeploy.bench.labels import resolve_labels
from sedeploy.backends.ort import OrtRunner
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
M = Path.home() / ".cache/sedeploy/headline/reference-112.onnx"
pp = Preprocess.for_size(112)
cal = calibrate(M, str(DATA / "imagenette/train"), count=512, cache_dir=Path(tempfile.gettempdir()) / "sedeploy-int8forms-cache", progress=False, preprocess=pp)
m = onnx.load(str(M))
w = [n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
order = [n.name for n in m.graph.node]
# last stage: nodes after the last stride-2 conv's block start ~ take the last 16 weighted nodes + everything after first of them
variants = {"none": set(), "stem": {w[0]}, "head": {w[-1]}, "stem+head": {w[0], w[-1]},
            "last stage": set(order[order.index(w[-17]):]), "stem+head+last stage": {w[0]} | set(order[order.index(w[-17]):])}
found = find_images(str(DATA / "imagenette/val"))
x, loaded = load_batch(list(found.paths), pp)
lab = resolve_labels(loaded, str(DATA / "imagenette/val"), num_classes=10).indices
def logits(p):
    r = OrtRunner(p, threads=2)
    return np.concatenate([r.run(x[i:i+64]) for i in range(0, len(x), 64)])
ref = logits(M)
orig = Q._se_nodes
out = {}
for name, ex in variants.items():
    Q._se_nodes = lambda model, ex=ex: set(ex)
    p = f"{tempfile.gettempdir()}/sedeploy-keep-float-{name.replace(' ', '_').replace('+','_')}.onnx"
    Q.quantize_model(M, cal, p, flavour="cpu", se="fp32")
    g = logits(p)
    out[name] = {"excluded_nodes": len(ex), "agreement": float((g.argmax(1) == ref.argmax(1)).mean()),
                 "top1": float((g.argmax(1) == lab).mean()), "mean_abs_dlogit": float(np.abs(g - ref).mean())}
    print(name, out[name], flush=True)
Q._se_nodes = orig
print("fp32 top1", float((ref.argmax(1) == lab).mean()))
Path(__file__).with_name("int8_keep_float.json").write_text(json.dumps(out, indent=1))
