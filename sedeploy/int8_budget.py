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
   (:mod:`sedeploy.quantize`), so a strongly typed TensorRT network runs a fallback layer in FP16) for the smallest k
   that meets the budget: k = 1, 2, 4, …
   until it holds, then a bisection between the last failing and the first passing k. Agreement is not strictly
   monotone in k, so "fewest" is the fewest along this ranking, not a global optimum (that search is
   exponential) — said in the report.
4. Report the layers that fell back, the measured agreement / top-1 before and after, and the speed cost: FP32,
   all-INT8 and the budgeted INT8 timed interleaved (:func:`sedeploy.backends.timing.time_runners`) on the runtime
   the flavour is for (ONNX Runtime CPU for ``cpu``, OpenVINO for ``ov``; ``trt`` is timed by ``sedeploy bench``
   on a GPU). When even every layer in float misses the budget (or more than ``max_fallback`` layers would be needed),
   :class:`~sedeploy.errors.VerificationError` (exit 3) and nothing is written.

Held-out figures are only as fine as the held-out set: with 100 images one flip is 1 point, and a search that
stops as soon as the point figure meets the budget on *these* images overfits them (measured on a trained
reference: 99.0 % on the 2,000 search images, 98.49 % on 1,925 unseen ones). Every figure therefore comes with its
one-sided statistical bound (Wilson lower bound of the agreement, Bonett–Price upper bound of the paired top-1
drop), and ``--budget-confidence C`` (e.g. 0.95) makes the search meet the budget with that bound instead of the
point figure: the *true* agreement / drop on images of the same kind then meets the budget with confidence ≈ C —
somewhat less in fact, since the search tries several k on the same images and keeps the first that passes (a
finite set of new images still scatters around the true figure). A bound needs images: at 0.95 a 99 % agreement
cannot be shown with fewer than 268 held-out images, nor a 0.5 pt drop with fewer than 464, and that is refused
before any work.
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

from sedeploy import quantize
from sedeploy.backends.openvino import OpenVinoModelRunner
from sedeploy.backends.ort import OrtRunner
from sedeploy.backends.timing import paired_speedup, time_runners
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.metrics import REPORT_CONFIDENCE, agreement_lower_bound, as_logits, drop_upper_bound, images_needed, \
    images_needed_for_drop, metrics
from sedeploy.onnxcore import default_threads, image_input, load_onnx, output_kind, run_model
from sedeploy.preprocess import find_images

log = logging.getLogger("sedeploy")

#: images used for the per-layer sensitivity pass (the first of the held-out set); the budget itself is always
#: checked on every held-out image
SENSITIVITY_IMAGES = 128
#: held-out share of --calib when no --val is given
HOLDOUT_FRACTION = 0.25
MIN_HELDOUT = 16


#: how the fallback candidates are ranked (the search then takes the fewest top-k along the ranking)
FALLBACK_ORDERS = {
    "sensitivity": "leave-one-out sensitivity (mean KL vs FP32), fewest top-k along that ranking",
    "gain-per-cost": "leave-one-out KL gain per multiply-add kept in float, cheapest-to-fix first; fewest top-k "
                     "along that ranking",
}
DEFAULT_FALLBACK_ORDER = "sensitivity"


def check_fallback_order(order: str) -> None:
    """Refuse an unknown ``--fallback-order`` (one error, the choices named)."""
    if order not in FALLBACK_ORDERS:
        raise SedeployError(f"--fallback-order {order!r} is not valid.", expected=f"one of {', '.join(FALLBACK_ORDERS)}",
                            fix=f"omit it for the default ({DEFAULT_FALLBACK_ORDER})")


def rank_key(row: dict, order: str) -> tuple:
    """Sort key of a sensitivity row (most worth falling back first). Rows whose fallback does not lower the KL
    go last under either order, by their (non-positive) gain."""
    gain = row["kl_gain"]
    if order == "gain-per-cost" and gain > 0:
        return (0, -gain / max(row["macs"], 1), row["layer"])
    return (0 if gain > 0 else 1, -gain, row["layer"])


@dataclass(frozen=True)
class Budget:
    """What the INT8 model must achieve against FP32 on the held-out images."""

    max_top1_drop: float | None = None  # top-1 points (needs labels)
    min_agreement: float | None = None  # top-1 agreement with FP32, percent
    confidence: float | None = None  # None: the point figures; else their one-sided bounds at this confidence

    def __post_init__(self):
        if self.max_top1_drop is None and self.min_agreement is None:
            raise SedeployError("An INT8 accuracy budget needs --max-top1-drop and/or --min-agreement.")
        if self.max_top1_drop is not None and not (np.isfinite(self.max_top1_drop) and self.max_top1_drop >= 0):
            raise SedeployError(f"--max-top1-drop {self.max_top1_drop} is not valid.",
                                expected="top-1 points ≥ 0, e.g. 0.5")
        if self.min_agreement is not None and not (0.0 < self.min_agreement <= 100.0):
            raise SedeployError(f"--min-agreement {self.min_agreement} is not valid.",
                                expected="a percentage in (0, 100], e.g. 99")
        if self.confidence is None:
            return
        if not (0.5 <= self.confidence < 1.0):
            raise SedeployError(f"--budget-confidence {self.confidence} is not valid.",
                                expected="a probability in [0.5, 1), e.g. 0.95",
                                fix="omit it to budget on the point figures of the held-out images")
        if self.min_agreement is not None and images_needed(self.min_agreement, self.confidence) is None:
            raise SedeployError(f"--min-agreement {self.min_agreement} with --budget-confidence {self.confidence}: "
                                f"no finite set of held-out images can show 100 % agreement at a confidence.",
                                fix="budget a lower agreement, e.g. 99.5, or drop --budget-confidence")
        if self.max_top1_drop is not None and images_needed_for_drop(self.max_top1_drop, self.confidence) is None:
            raise SedeployError(f"--max-top1-drop {self.max_top1_drop} with --budget-confidence {self.confidence}: "
                                f"no finite set of held-out images can show a zero drop at a confidence.",
                                fix="budget a positive drop, e.g. 0.5, or drop --budget-confidence")

    def check_images(self, n: int) -> None:
        """Refuse, before any work, a held-out set too small to show the budget at the confidence."""
        if self.confidence is None:
            return
        short = []
        if self.min_agreement is not None:
            need = images_needed(self.min_agreement, self.confidence)
            if n < need:
                short.append((need, f"top-1 agreement ≥ {self.min_agreement} % (even with every image agreeing, the "
                                    f"lower bound is {agreement_lower_bound(n, n, self.confidence):.2f} %)"))
        if self.max_top1_drop is not None:
            need = images_needed_for_drop(self.max_top1_drop, self.confidence)
            if n < need:
                short.append((need, f"a top-1 drop ≤ {self.max_top1_drop} pt (even with no prediction changed, "
                                    f"the upper bound is {drop_upper_bound(0, 0, n, self.confidence):.2f} pt)"))
        if short:
            raise SedeployError(
                f"{n} held-out images cannot show {' nor '.join(w for _, w in short)} at confidence "
                f"{self.confidence}.",
                expected=f"≥ {max(k for k, _ in short)} held-out images for this budget",
                fix="pass a larger --val DIR (or a larger --calib to split), lower --budget-confidence, or "
                    "drop it to budget on the point figure")

    def violations(self, m: dict) -> list[str]:
        """What ``m`` (from :func:`sedeploy.metrics.metrics`) misses, judged on the bounds when a confidence is set."""
        out = []
        if self.confidence is None:
            agree, drop, what = m["agreement_pct"], m["top1_drop_pts"], ""
        else:
            agree = agreement_lower_bound(m["agree"], m["n"], self.confidence)
            drop = (drop_upper_bound(m["fp32_only"], m["int8_only"], m["n"], self.confidence)
                    if "fp32_only" in m else m["top1_drop_pts"])
            what = f" ({self.confidence:g} bound; point {{:.2f}})"
        if self.min_agreement is not None and agree < self.min_agreement:
            out.append(f"top-1 agreement {agree:.2f} %{what.format(m['agreement_pct'])} < {self.min_agreement} %")
        if self.max_top1_drop is not None and drop > self.max_top1_drop:
            out.append(f"top-1 drop {drop:.2f} pt{what.format(m['top1_drop_pts'])} > {self.max_top1_drop} pt")
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
    strategy: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------- held-out
def heldout_count(n: int, fraction: float = HOLDOUT_FRACTION, *, min_heldout: int = MIN_HELDOUT,
                  most: int | None = None) -> int:
    """How many of ``n`` images :func:`heldout_split` holds out: ``fraction`` of them, at least ``min_heldout``
    and at most ``most``."""
    k = max(min_heldout, int(round(n * fraction)))
    return k if most is None else min(k, most)


def heldout_split(folder: str | os.PathLike, seed: int = 0, fraction: float = HOLDOUT_FRACTION, *,
                  min_heldout: int = MIN_HELDOUT, min_rest: int = MIN_HELDOUT, most: int | None = None):
    """(root, held-out paths, relative paths to keep out of calibration): a seeded ``fraction`` of the folder
    (:func:`heldout_count`), leaving at least ``min_rest`` images to calibrate on."""
    found = find_images(folder, what="calibration image folder")
    n = len(found.paths)
    k = heldout_count(n, fraction, min_heldout=min_heldout, most=most)
    if k < min_heldout or n - k < min_rest:
        raise SedeployError(f"'{found.root}' holds {n} images: too few to split into calibration and held-out "
                            f"sets (calibration needs ≥ {min_rest}, the held-out set ≥ {min_heldout}).",
                            fix="add images, or pass a separate held-out folder with --val DIR")
    pick = np.sort(np.random.default_rng(seed + 7919).choice(n, size=k, replace=False))
    held = [found.paths[i] for i in pick]
    return found.root, held, {p.relative_to(found.root).as_posix() for p in held}


# ------------------------------------------------------------------------------------------------- the search
def quantize_to_budget(fp32_path, calibration, out_path, *, flavour: str, images: np.ndarray,
                       budget: Budget, labels: np.ndarray | None = None, se: str | None = None,
                       max_fallback: int | None = None, sensitivity_images: int = SENSITIVITY_IMAGES,
                       time_speed: bool = True, threads: int | None = None, keep_fp32=None,
                       order: str = DEFAULT_FALLBACK_ORDER):
    """Write the INT8 ``flavour`` of ``fp32_path`` to ``out_path`` with the fewest layers in float that meet
    ``budget`` on ``images`` (preprocessed N×3×H×W, ``labels`` optional). Returns (QuantReport, BudgetReport).
    Raises VerificationError, writing nothing, when the budget cannot be met."""
    t0 = time.perf_counter()
    _check_request(budget, images, labels, order)
    se = quantize.DEFAULT_SE_POLICY if se is None else se
    out_path = Path(out_path)
    kind = output_kind(load_onnx(fp32_path, check=False))
    ref = as_logits(run_model(fp32_path, images), kind)
    # candidates: the quantized weighted layers (the head is already float under the default head policy)
    in_float = set(quantize.float_head_layers(fp32_path, flavour))
    layers = [layer for layer in quantize.weighted_layers(fp32_path) if layer not in in_float]
    groups = quantize.float_groups(fp32_path, layers, flavour)

    def nodes_of(chosen):
        return sorted({n for layer in chosen for n in groups[layer]})

    # in the CPU/OpenVINO forms a layer falls back with the layer feeding it (its float group), and the float head
    # with its own, so some sets of fewer than every layer already leave nothing in INT8: those are not candidates
    head_nodes = {n for group in quantize.float_groups(fp32_path, sorted(in_float), flavour).values() for n in group}
    every = set(quantize.weighted_layers(fp32_path))

    def leaves_int8(chosen) -> bool:
        return not every <= set(nodes_of(chosen)) | head_nodes

    n_sens = min(len(images), sensitivity_images)
    work = Path(tempfile.mkdtemp(prefix=".int8-budget-", dir=out_path.parent))
    try:
        def build(exclude, name):
            path = work / f"{name}.onnx"
            qr = quantize.quantize_model(fp32_path, calibration, path, flavour=flavour, se=se, exclude=exclude,
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
                              output_kind=kind, strategy=FALLBACK_ORDERS[order])
        chosen_path, chosen_qr, fell_back = all_path, all_qr, []
        if budget.violations(base):
            if max_fallback == 0:  # no layer may fall back: nothing to measure
                raise VerificationError(
                    f"INT8 ({flavour}) cannot meet the budget ({_budget_text(budget)}) on {len(images)} held-out "
                    f"images: with every layer quantized {'; '.join(budget.violations(base))}, and no layer may "
                    f"fall back (--max-fallback 0). Nothing was written.",
                    fix="allow fallback layers (--max-fallback N), relax --min-agreement / --max-top1-drop, or "
                        "improve the calibration (more or more representative --calib images)")
            log.info("INT8 %s misses the budget with every layer quantized (%s); measuring %d layers' "
                     "sensitivity on %d images", flavour, "; ".join(budget.violations(base)), len(layers), n_sens)
            macs = quantize.layer_macs(fp32_path) if order == "gain-per-cost" else {}
            report.sensitivity = sens = _sensitivity([layer for layer in layers if leaves_int8([layer])],
                                                     lambda layer, name: build(nodes_of([layer]), name)[0],
                                                     lambda path: evaluate(path, n_sens), evaluate(all_path, n_sens),
                                                     macs, order)
            ranking = [r["layer"] for r in sens]
            # at least one layer stays INT8: with every layer in float there is no INT8 artifact to write (the
            # search would end in the quantizer's "quantized no operator" instead of the budget's own verdict)
            limit = max(0, len(ranking) - 1) if max_fallback is None else min(max_fallback, len(ranking) - 1)
            while limit > 0 and not leaves_int8(ranking[:limit]):  # stop while a weighted layer is still INT8
                limit -= 1
            if limit <= 0:
                raise _unmet(flavour, budget, len(images), base, base, 0, len(layers), base, max_fallback)
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
                raise _unmet(flavour, budget, len(images), base, tried[k][2], k, len(layers), best, max_fallback)
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


def _check_request(budget: Budget, images: np.ndarray, labels: np.ndarray | None, order: str) -> None:
    """Refuse, before any work, a budget the held-out images cannot check."""
    if budget.max_top1_drop is not None and labels is None:
        raise SedeployError("--max-top1-drop needs labelled held-out images, and these have no labels.",
                            fix="pass --val DIR with class subfolders (or a labelled --calib), or budget on "
                                "--min-agreement instead (needs no labels)")
    if len(images) < MIN_HELDOUT:
        raise SedeployError(f"{len(images)} held-out images are too few for an accuracy budget.",
                            expected=f"≥ {MIN_HELDOUT} (a few hundred for sub-point budgets)")
    budget.check_images(len(images))
    check_fallback_order(order)


def _sensitivity(layers: list[str], build_without, evaluate, base_sens: dict, macs: dict, order: str) -> list[dict]:
    """Leave-one-out sensitivity rows, most worth falling back first: ``build_without(layer, name)`` writes the
    model with that layer in float, ``evaluate(path)`` measures it on the sensitivity images."""
    sens = []
    for i, layer in enumerate(layers):
        path = build_without(layer, f"loo{i}")
        m = evaluate(path)
        path.unlink()
        sens.append({"layer": layer, "mean_kl": m["mean_kl"], "agreement_pct": m["agreement_pct"],
                     "kl_gain": base_sens["mean_kl"] - m["mean_kl"], "macs": macs.get(layer)})
    sens.sort(key=lambda r: rank_key(r, order))
    return sens


def _unmet(flavour: str, budget: Budget, n: int, base: dict, last: dict, k: int, n_layers: int, best: dict,
           max_fallback: int | None) -> VerificationError:
    """The error when even ``k`` layers in float (the most the search may use) miss the budget."""
    return VerificationError(
        f"INT8 ({flavour}) cannot meet the budget ({_budget_text(budget)}) on {n} held-out "
        f"images: with every layer quantized {'; '.join(budget.violations(base))}, and still "
        f"{'; '.join(budget.violations(last))} with {k} of {n_layers} weighted layers in "
        f"float (best agreement {best['agreement_pct']:.2f} %, {REPORT_CONFIDENCE:.0%} lower bound "
        f"{best['agreement_lcb_pct']:.2f} %). Nothing was written.",
        fix="relax --min-agreement / --max-top1-drop, improve the calibration (more or more "
            "representative --calib images, another --calib-method), or use FP16"
            + ("" if max_fallback is None else ", or allow more fallback layers")
            + ("" if budget.confidence is None else
               ", or show the bound with more held-out images (--val) or a lower --budget-confidence"))


def _budget_text(b: Budget) -> str:
    parts = []
    if b.min_agreement is not None:
        parts.append(f"agreement ≥ {b.min_agreement} %")
    if b.max_top1_drop is not None:
        parts.append(f"top-1 drop ≤ {b.max_top1_drop} pt")
    if b.confidence is not None:
        parts.append(f"at confidence {b.confidence:g}")
    return ", ".join(parts)


def _speed(fp32_path, all_path, chosen_path, images, threads, flavour: str = "cpu") -> dict:
    """FP32 vs all-INT8 vs budgeted INT8, interleaved, at the model's batch (8 if dynamic), on the runtime the
    flavour is for: ONNX Runtime CPU (``cpu``) or OpenVINO CPU (``ov``; FP32 is OpenVINO reading the FP32 ONNX)."""
    batch = image_input(load_onnx(fp32_path, check=False)).static_batch or 8
    if flavour == "ov":
        threads = default_threads() if threads is None else threads
        runners = {"fp32": OpenVinoModelRunner(fp32_path, precision="fp32", threads=threads),
                   "int8_all": OpenVinoModelRunner(all_path, precision="int8", threads=threads),
                   "int8_budget": OpenVinoModelRunner(chosen_path, precision="int8", threads=threads)}
        backend = "openvino-cpu"
    else:
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
