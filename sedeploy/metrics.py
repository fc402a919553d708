"""Pure figures of how far one classifier's outputs are from another's, shared by the build and the benchmark.

- :func:`log_softmax`, :func:`kl_divergence` (float64, stable for large logits) and :func:`topk_correct`
  (ties broken towards lower class indices);
- one-sided statistical bounds of a figure measured on a finite set of images: the Wilson score lower bound of an
  agreement rate (:func:`agreement_lower_bound`) and the Bonett–Price upper bound of a paired top-1 drop
  (:func:`drop_upper_bound`), with the fewest images that can show a given figure at a confidence;
- :func:`metrics`: agreement (and top-1 drop with labels) of one model's logits against a reference's, with the
  counts behind them and their bounds at :data:`REPORT_CONFIDENCE`; :func:`as_logits` turns probabilities into
  log-probabilities so the same figures keep their meaning.

Only numpy is imported.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from sedeploy.errors import SedeployError

__all__ = ["log_softmax", "kl_divergence", "topk_correct", "agreement_lower_bound", "drop_upper_bound",
           "images_needed", "images_needed_for_drop", "metrics", "as_logits", "REPORT_CONFIDENCE"]

#: one-sided confidence of the bounds reported beside every figure (the budget uses them only with a confidence)
REPORT_CONFIDENCE = 0.95


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, engine: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(reference) ‖ softmax(engine)) in nats (≥ 0; 0 when the rows are equal up to a shift)."""
    lp, lq = log_softmax(reference), log_softmax(engine)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per row: is ``labels[i]`` among the ``k`` highest logits of row ``i``?

    Ties at the k-th place are broken towards lower class indices (a stable sort), so the result is deterministic.
    """
    logits = np.asarray(logits)
    k = min(k, logits.shape[1])
    # stable argsort of -logits: highest first, equal values in index order
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def _check_counts(n: int, *counts: int) -> None:
    if n <= 0 or any(c < 0 or c > n for c in counts):
        raise SedeployError(f"Image counts {counts} of {n} images are not valid.",
                            expected="n > 0 and every count within 0…n")


def agreement_lower_bound(agree: int, n: int, confidence: float) -> float:
    """One-sided Wilson score lower bound (percent) of the agreement rate, ``agree`` of ``n`` images."""
    _check_counts(n, agree)
    z, p = _z(confidence), agree / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * max(0.0, (centre - spread) / (1 + z * z / n))


def drop_upper_bound(fp32_only: int, int8_only: int, n: int, confidence: float) -> float:
    """One-sided upper bound (points) of the paired top-1 drop: ``fp32_only`` images right only in FP32,
    ``int8_only`` right only in INT8. Bonett–Price adjusted Wald interval for a difference of paired proportions
    (one pseudo count in each discordant cell, n + 2): close to nominal even when few predictions flip, where a
    plain normal approximation claims more certainty than it has."""
    _check_counts(n, fp32_only, int8_only, fp32_only + int8_only)
    p12, p21, m = (fp32_only + 1) / (n + 2), (int8_only + 1) / (n + 2), n + 2
    d = p12 - p21
    return 100.0 * (d + _z(confidence) * math.sqrt(max(p12 + p21 - d * d, 0.0) / m))


def images_needed(min_agreement: float, confidence: float) -> int | None:
    """Fewest images whose Wilson lower bound can reach ``min_agreement`` % (when every image agrees); None for
    100 %, which no finite sample can show."""
    a = min_agreement / 100.0
    if a >= 1.0:
        return None
    return math.ceil(_z(confidence) ** 2 * a / (1.0 - a))


def images_needed_for_drop(max_top1_drop: float, confidence: float) -> int | None:
    """Fewest images whose drop bound can reach ``max_top1_drop`` points (when no prediction flips); None for a
    zero drop, which no finite sample can show."""
    if max_top1_drop <= 0:
        return None
    lo, hi = 1, 2
    while drop_upper_bound(0, 0, hi, confidence) > max_top1_drop:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the bound without flips falls as n grows
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if drop_upper_bound(0, 0, mid, confidence) <= max_top1_drop else (mid, hi)
    return hi if drop_upper_bound(0, 0, lo, confidence) > max_top1_drop else lo


def metrics(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """Agreement (and top-1 drop with labels) of ``got`` against ``ref``, both as logits, with the counts behind
    them and their one-sided bounds at :data:`REPORT_CONFIDENCE`."""
    a, b = ref.argmax(1), got.argmax(1)
    n, agree = len(a), int((a == b).sum())
    m = {"n": n, "agree": agree, "agreement_pct": round(agree * 100.0 / n, 3),
         "agreement_lcb_pct": round(agreement_lower_bound(agree, n, REPORT_CONFIDENCE), 3),
         "mean_kl": float(kl_divergence(ref, got).mean()), "top1_drop_pts": 0.0}
    if labels is not None:
        ok_ref, ok_got = a == labels, b == labels
        fp32_only, int8_only = int((ok_ref & ~ok_got).sum()), int((ok_got & ~ok_ref).sum())
        t_ref, t_got = float(ok_ref.mean() * 100.0), float(ok_got.mean() * 100.0)
        m.update(top1_fp32_pct=round(t_ref, 3), top1_int8_pct=round(t_got, 3), top1_drop_pts=round(t_ref - t_got, 3),
                 fp32_only=fp32_only, int8_only=int8_only,
                 top1_drop_ucb_pts=round(drop_upper_bound(fp32_only, int8_only, n, REPORT_CONFIDENCE), 3))
    return m


def as_logits(out: np.ndarray, kind: str) -> np.ndarray:
    """Classifier outputs as logits: log(p) for probabilities (softmax(log p) = p), else as they are."""
    out = out.astype(np.float64)
    if kind == "probabilities":
        return np.log(np.maximum(out, 1e-30))
    return out
