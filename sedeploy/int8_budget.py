"""INT8 that meets an accuracy budget: per-layer sensitivity, then the fewest layers back in float.

``build-engine --int8 --min-agreement A`` (top-1 agreement with the FP32 model, %, needs no labels) and/or
``--max-top1-drop P`` (top-1 points lost against the labels) are checked on held-out images — ``--val DIR``, or a
deterministic split of ``--calib`` that calibration then does not see. Per INT8 flavour:

1. Quantize every layer (the normal artifact). If it meets the budget, that is the result: no fallback.
2. Otherwise measure each weighted layer's sensitivity **leave-one-out**: quantize everything except that one
   layer and measure the divergence from FP32 (mean KL over the sensitivity images, plus agreement). Why
   leave-one-out rather than quantizing one layer at a time: the budget is about the fully quantized network, and
   a layer's error matters in the context of every other layer's error (errors compound through the residual
   stream); quantize-one-at-a-time measures each layer against an otherwise exact network and misses that. Both
   cost one quantize-and-evaluate per layer. Layers are ranked by how much keeping them in float lowers the KL.
3. Fall back the top-k layers (CPU flavour: FP32 via ONNX Runtime's ``nodes_to_exclude`` — the layer *and* the
   quantized non-weighted ops that produce its input (hard-swish Mul, residual Add, pools …): in the QOperator form
   a tensor is rounded once by its producer (back to the previous Conv), so keeping only the Conv in float would
   still read a rounded input;
   TensorRT flavour: no Q/DQ on the layer's input and weight; the artifact is the FP16 graph with Q/DQ inside
   (:mod:`sedeploy.int8`), so a strongly typed TensorRT network runs a fallback layer in FP16) for the smallest k
   that meets the budget: k = 1, 2, 4, …
   until it holds, then a bisection between the last failing and the first passing k. Agreement is not strictly
   monotone in k, so "fewest" is the fewest along this ranking, not a global optimum (that search is
   exponential) — said in the report.
4. Report the layers that fell back, the measured agreement / top-1 before and after, and the speed cost: FP32,
   all-INT8 and the budgeted INT8 timed interleaved (:func:`sedeploy.bench.timing.time_runners`) on the runtime
   the flavour is for (ONNX Runtime CPU for ``cpu``, OpenVINO for ``ov``; ``trt`` is timed by ``sedeploy bench``
   on a GPU). When even every layer in float misses the budget (or more than ``max_fallback`` layers would be needed),
   :class:`~sedeploy.errors.VerificationError` (exit 3) and nothing is written.

Held-out figures are only as fine as the held-out set: with 100 images one flip is 1 point. The report states the
image count; use ``--val`` with a few hundred images for budgets below a point.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy.errors import SedeployError, VerificationError

log = logging.getLogger("sedeploy")

#: images used for the per-layer sensitivity pass (the first of the held-out set); the budget itself is always
#: checked on every held-out image
SENSITIVITY_IMAGES = 128
#: held-out share of --calib when no --val is given
HOLDOUT_FRACTION = 0.25
MIN_HELDOUT = 16


@dataclass(frozen=True)
class Budget:
    """What the INT8 model must achieve against FP32 on the held-out images."""

    max_top1_drop: float | None = None  # top-1 points (needs labels)
    min_agreement: float | None = None  # top-1 agreement with FP32, percent

    def __post_init__(self):
        if self.max_top1_drop is None and self.min_agreement is None:
            raise SedeployError("An INT8 accuracy budget needs --max-top1-drop and/or --min-agreement.")
        if self.max_top1_drop is not None and not (np.isfinite(self.max_top1_drop) and self.max_top1_drop >= 0):
            raise SedeployError(f"--max-top1-drop {self.max_top1_drop} is not valid.",
                                expected="top-1 points ≥ 0, e.g. 0.5")
        if self.min_agreement is not None and not (0.0 < self.min_agreement <= 100.0):
            raise SedeployError(f"--min-agreement {self.min_agreement} is not valid.",
                                expected="a percentage in (0, 100], e.g. 99")

    def violations(self, m: dict) -> list[str]:
        out = []
        if self.min_agreement is not None and m["agreement_pct"] < self.min_agreement:
            out.append(f"top-1 agreement {m['agreement_pct']:.2f} % < {self.min_agreement} %")
        if self.max_top1_drop is not None and m["top1_drop_pts"] > self.max_top1_drop:
            out.append(f"top-1 drop {m['top1_drop_pts']:.2f} pt > {self.max_top1_drop} pt")
        return out


@dataclass
class BudgetReport:
    flavour: str
    budget: dict
    met: bool
    n_images: int
    labelled: bool
    all_int8: dict  # metrics of the fully quantized model
    result: dict  # metrics of the written model
    fell_back: list[str] = field(default_factory=list)  # weighted layers kept in float
    fell_back_nodes: list[str] = field(default_factory=list)  # every node excluded from INT8 for them
    layers: int = 0  # weighted layers in the model
    sensitivity: list[dict] = field(default_factory=list)  # per layer, most sensitive first
    search: list[dict] = field(default_factory=list)  # (k, metrics) tried
    speed: dict = field(default_factory=dict)
    output_kind: str = "logits"
    strategy: str = "leave-one-out sensitivity (mean KL vs FP32), fewest top-k along that ranking"
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- metrics
def metrics(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """Agreement (and top-1 drop with labels) of ``got`` against ``ref``; both as logits."""
    from sedeploy.bench.accuracy import kl_divergence

    a, b = ref.argmax(1), got.argmax(1)
    m = {"agreement_pct": round(float((a == b).mean() * 100.0), 3),
         "mean_kl": float(kl_divergence(ref, got).mean()), "top1_drop_pts": 0.0}
    if labels is not None:
        t_ref, t_got = float((a == labels).mean() * 100.0), float((b == labels).mean() * 100.0)
        m.update(top1_fp32_pct=round(t_ref, 3), top1_int8_pct=round(t_got, 3), top1_drop_pts=round(t_ref - t_got, 3))
    return m


def as_logits(out: np.ndarray, kind: str) -> np.ndarray:
    """Classifier outputs as logits: log(p) for probabilities (softmax(log p) = p), else as they are."""
    out = out.astype(np.float64)
    if kind == "probabilities":
        return np.log(np.maximum(out, 1e-30))
    return out


# --------------------------------------------------------------------------------------------------- held-out
def heldout_split(folder: str | os.PathLike, seed: int = 0, fraction: float = HOLDOUT_FRACTION):
    """(root, held-out paths, relative paths to keep out of calibration): a seeded ``fraction`` of the folder."""
    from sedeploy.preprocess import find_images

    found = find_images(folder, what="calibration image folder")
    n = len(found.paths)
    k = max(MIN_HELDOUT, int(round(n * fraction)))
    if n - k < MIN_HELDOUT:
        raise SedeployError(f"'{found.root}' holds {n} images: too few to split into calibration and held-out "
                            f"sets (each needs ≥ {MIN_HELDOUT}).",
                            fix="add images, or pass a separate held-out folder with --val DIR")
    pick = np.sort(np.random.default_rng(seed + 7919).choice(n, size=k, replace=False))
    held = [found.paths[i] for i in pick]
    return found.root, held, {p.relative_to(found.root).as_posix() for p in held}


# ------------------------------------------------------------------------------------------------- the search
def quantize_to_budget(fp32_path, calibration, out_path, *, flavour: str, images: np.ndarray,
                       budget: Budget, labels: np.ndarray | None = None, se: str | None = None,
                       max_fallback: int | None = None, sensitivity_images: int = SENSITIVITY_IMAGES,
                       time_speed: bool = True, threads: int | None = None, keep_fp32=None):
    """Write the INT8 ``flavour`` of ``fp32_path`` to ``out_path`` with the fewest layers in float that meet
    ``budget`` on ``images`` (preprocessed N×3×H×W, ``labels`` optional). Returns (QuantReport, BudgetReport).
    Raises VerificationError, writing nothing, when the budget cannot be met."""
    from sedeploy import int8
    from sedeploy.onnxcore import load_onnx, output_kind, run_model

    t0 = time.perf_counter()
    if budget.max_top1_drop is not None and labels is None:
        raise SedeployError("--max-top1-drop needs labelled held-out images, and these have no labels.",
                            fix="pass --val DIR with class subfolders (or a labelled --calib), or budget on "
                                "--min-agreement instead (needs no labels)")
    if len(images) < MIN_HELDOUT:
        raise SedeployError(f"{len(images)} held-out images are too few for an accuracy budget.",
                            expected=f"≥ {MIN_HELDOUT} (a few hundred for sub-point budgets)")
    se = int8.DEFAULT_SE_POLICY if se is None else se
    out_path = Path(out_path)
    kind = output_kind(load_onnx(fp32_path, check=False))
    ref = as_logits(run_model(fp32_path, images), kind)
    # candidates: the quantized weighted layers (the head is already float under the default head policy)
    in_float = set(int8.float_head_layers(fp32_path, flavour))
    layers = [layer for layer in int8.weighted_layers(fp32_path) if layer not in in_float]
    groups = int8.float_groups(fp32_path, layers, flavour)

    def nodes_of(chosen):
        return sorted({n for layer in chosen for n in groups[layer]})

    n_sens = min(len(images), sensitivity_images)
    work = Path(tempfile.mkdtemp(prefix=".int8-budget-", dir=out_path.parent))
    try:
        def build(exclude, name):
            path = work / f"{name}.onnx"
            qr = int8.quantize_model(fp32_path, calibration, path, flavour=flavour, se=se, exclude=exclude,
                                     keep_fp32=keep_fp32)
            return path, qr

        def evaluate(path, subset=None):
            x = images if subset is None else images[:subset]
            lab = labels if subset is None or labels is None else labels[:subset]
            return metrics(ref if subset is None else ref[:subset], as_logits(run_model(path, x), kind), lab)

        all_path, all_qr = build((), "all")
        base = evaluate(all_path)
        report = BudgetReport(flavour=flavour, budget=asdict(budget), met=False, n_images=len(images),
                              labelled=labels is not None, all_int8=base, result=base, layers=len(layers),
                              output_kind=kind)
        chosen_path, chosen_qr, fell_back = all_path, all_qr, []
        if budget.violations(base):
            log.info("INT8 %s misses the budget with every layer quantized (%s); measuring %d layers' "
                     "sensitivity on %d images", flavour, "; ".join(budget.violations(base)), len(layers), n_sens)
            base_sens = evaluate(all_path, n_sens)
            sens = []
            for i, layer in enumerate(layers):
                path, _ = build(nodes_of([layer]), f"loo{i}")
                m = evaluate(path, n_sens)
                path.unlink()
                sens.append({"layer": layer, "mean_kl": m["mean_kl"], "agreement_pct": m["agreement_pct"],
                             "kl_gain": base_sens["mean_kl"] - m["mean_kl"]})
            sens.sort(key=lambda r: (-r["kl_gain"], r["layer"]))
            report.sensitivity = sens
            ranking = [r["layer"] for r in sens]
            limit = len(ranking) if max_fallback is None else min(max_fallback, len(ranking))
            tried: dict[int, tuple] = {}

            def attempt(k):
                if k not in tried:
                    path, qr = build(nodes_of(ranking[:k]), f"k{k}")
                    m = evaluate(path)
                    tried[k] = (path, qr, m)
                    report.search.append({"k": k, **m})
                return not budget.violations(tried[k][2])

            lo, k = 0, 1  # lo: largest k known to fail
            while k < limit and not attempt(k):
                lo, k = k, min(2 * k, limit)
            if not attempt(k):
                best = max((t[2] for t in tried.values()), key=lambda m: m["agreement_pct"])
                raise VerificationError(
                    f"INT8 ({flavour}) cannot meet the budget ({_budget_text(budget)}) on {len(images)} held-out "
                    f"images: with every layer quantized {'; '.join(budget.violations(base))}, and still "
                    f"{'; '.join(budget.violations(tried[k][2]))} with {k} of {len(layers)} weighted layers in "
                    f"float (best agreement tried {best['agreement_pct']:.2f} %). Nothing was written.",
                    fix="relax --min-agreement / --max-top1-drop, improve the calibration (more or more "
                        "representative --calib images, another --calib-method), or use FP16"
                        + ("" if max_fallback is None else ", or allow more fallback layers"))
            hi = k
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(mid):
                    hi = mid
                else:
                    lo = mid
            chosen_path, chosen_qr, m = tried[hi]
            fell_back = ranking[:hi]
            report.result = m
        report.met = True
        report.fell_back = fell_back
        report.fell_back_nodes = nodes_of(fell_back)
        if time_speed and flavour != "trt":  # the TensorRT form is timed on the GPU (sedeploy bench)
            report.speed = _speed(fp32_path, all_path, chosen_path, images, threads, flavour)
        out_path.unlink(missing_ok=True)
        os.replace(chosen_path, out_path)
        chosen_qr.path = str(out_path)
        report.seconds = round(time.perf_counter() - t0, 2)
        chosen_qr.settings = {**chosen_qr.settings, "budget": {"met": True, "fell_back": fell_back,
                                                               "agreement_pct": report.result["agreement_pct"]}}
        return chosen_qr, report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _budget_text(b: Budget) -> str:
    parts = []
    if b.min_agreement is not None:
        parts.append(f"agreement ≥ {b.min_agreement} %")
    if b.max_top1_drop is not None:
        parts.append(f"top-1 drop ≤ {b.max_top1_drop} pt")
    return ", ".join(parts)


def _speed(fp32_path, all_path, chosen_path, images, threads, flavour: str = "cpu") -> dict:
    """FP32 vs all-INT8 vs budgeted INT8, interleaved, at the model's batch (8 if dynamic), on the runtime the
    flavour is for: ONNX Runtime CPU (``cpu``) or OpenVINO CPU (``ov``; FP32 is OpenVINO reading the FP32 ONNX)."""
    from sedeploy.bench.timing import paired_speedup, time_runners
    from sedeploy.onnxcore import default_threads, image_input, load_onnx

    batch = image_input(load_onnx(fp32_path, check=False)).static_batch or 8
    if flavour == "ov":
        from sedeploy.backends.openvino import OpenVinoModelRunner

        threads = default_threads() if threads is None else threads
        runners = {"fp32": OpenVinoModelRunner(fp32_path, precision="fp32", threads=threads),
                   "int8_all": OpenVinoModelRunner(all_path, precision="int8", threads=threads),
                   "int8_budget": OpenVinoModelRunner(chosen_path, precision="int8", threads=threads)}
        backend = "openvino-cpu"
    else:
        from sedeploy.backends.ort import OrtRunner

        runners = {"fp32": OrtRunner(fp32_path, threads=threads), "int8_all": OrtRunner(all_path, threads=threads),
                   "int8_budget": OrtRunner(chosen_path, threads=threads)}
        backend = "onnxruntime-cpu"
    for r in runners.values():
        r.activate()
    try:
        t = time_runners(runners, images, batch_sizes=[batch], warmup=2, repeats=15, settle=1)
    finally:
        for r in runners.values():
            r.deactivate()
    s = {n: t.samples[n][batch] for n in runners}
    return {"batch": batch, "backend": backend, "repeats": len(s["fp32"]),
            "median_ms": {n: round(float(np.median(v)) * 1e3, 3) for n, v in s.items()},
            "speedup_vs_fp32": {n: round(paired_speedup(s["fp32"], s[n]) or float("nan"), 3)
                                for n in ("int8_all", "int8_budget")},
            "budget_over_all_int8_time": round(1.0 / (paired_speedup(s["int8_all"], s["int8_budget"]) or
                                                      float("nan")), 3),
            "loadavg": list(os.getloadavg()),
            "timer": f"one Runner.infer call ({backend}) per sample; medians of interleaved rounds"}
