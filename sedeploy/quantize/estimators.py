"""Range estimators of INT8 calibration: per tensor, a running min/max and a histogram of |x|, and the clipping
threshold each method picks on it.

Methods
    ``minmax``      the observed min and max. Exact for what was seen, but one outlier pixel widens the range
                    (and so the quantisation step) for every other value.
    ``entropy``     TensorRT's calibrator: the clipping threshold on |x| whose 128-level quantised histogram
                    loses the least information (minimum KL divergence), searched on a 2048-bin histogram.
    ``percentile``  clip |x| at a percentile of its histogram (default 99.99 %).
    ``mse``         per tensor, the clipping threshold on |x| that minimises the expected squared quantisation
                    error on its histogram: values inside the range cost the rounding noise step²/12 (step =
                    amax/127), values beyond it their clipping error. Each tensor gets its own trade-off (a
                    heavy-tailed tensor is clipped, a compact one keeps its max), which is what choosing the range
                    estimator per tensor by quantisation error amounts to: the sweep covers the min/max,
                    percentile and entropy thresholds as candidates and keeps the one with the least error.

The histograms are sedeploy's own (numpy), not ``onnxruntime.quantization``'s calibrators (see
:mod:`sedeploy.quantize.calibration`). Each batch is binned as soon as it comes out of ONNX Runtime, on a grid of
2048 bins over [0, 2^k] that is re-binned (adjacent pairs merged, which is exact) when a larger value appears; the
final histogram is therefore the same whatever the batch size or image order.
"""
from __future__ import annotations

import math

import numpy as np

from sedeploy.errors import SedeployError

METHODS = ("entropy", "minmax", "percentile", "mse")
DEFAULT_PERCENTILE = 99.99
HIST_BINS = 2048
QUANT_BINS = 128  # int8 has 127 positive levels; TensorRT's entropy calibrator merges into 128 bins
INT8_LEVELS = 127  # positive levels of symmetric int8
UINT8_LEVELS = 255  # levels of uint8 over [0, hi] (zero point 0)


def method_params(method: str, percentile: float = DEFAULT_PERCENTILE) -> dict:
    """The parameters a method's result depends on (all go into the cache key)."""
    if method == "minmax":
        return {}
    if method == "entropy":
        return {"bins": HIST_BINS, "quantized_bins": QUANT_BINS}
    if method == "mse":
        return {"bins": HIST_BINS, "levels": int(INT8_LEVELS), "uint8_levels": int(UINT8_LEVELS)}
    return {"bins": HIST_BINS, "percentile": float(percentile)}


class TensorStats:
    """Running min/max and, for histogram methods, a 2048-bin histogram of |x| over [0, 2^k].

    Growing the range by a factor two merges adjacent bin pairs: a value's bin index on the coarser grid is exactly
    ``index // 2`` (scaling by a power of two is exact in floating point), so the final histogram is the one the
    whole data set would give on the final grid, independent of batch size and order.
    """

    __slots__ = ("lo", "hi", "hist", "top")

    def __init__(self, histogram: bool):
        self.lo, self.hi = math.inf, -math.inf
        self.hist = np.zeros(HIST_BINS, np.int64) if histogram else None
        self.top: float | None = None  # histogram covers [0, top]

    def update(self, x: np.ndarray) -> None:
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.hist is None:
            return
        amax = max(abs(lo), abs(hi))
        if not math.isfinite(amax):
            raise SedeployError("The model produced inf/NaN activations during calibration.",
                                fix="check the FP32 model runs correctly on these images (sedeploy verify)")
        if amax == 0.0:
            self.hist[0] += x.size
            return
        need = 2.0 ** math.ceil(math.log2(amax))
        if self.top is None:
            self.top = need
        while self.top < need:  # coarsen: merge pairs, keep bin count
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(1), np.zeros(HIST_BINS // 2, np.int64)])
            self.top *= 2.0
        a = np.abs(x)
        a *= np.float32(HIST_BINS / self.top)
        np.minimum(a, HIST_BINS - 1, out=a)
        self.hist += np.bincount(a.astype(np.int16), minlength=HIST_BINS)  # int16: 2048 bins fit, casts fastest

    def range(self, method: str, params: dict) -> tuple[float, float]:
        if self.lo == math.inf:
            return 0.0, 0.0
        if method == "minmax" or self.top is None:  # top None: the tensor was all zeros
            return self.lo, self.hi
        if method == "entropy":
            amax = entropy_amax(self.hist, self.top, params["quantized_bins"])
        elif method == "mse":
            amax = mse_amax(self.hist, self.top, params["levels"])
        else:
            amax = percentile_amax(self.hist, self.top, params["percentile"])
        amax = min(amax, max(abs(self.lo), abs(self.hi)))
        return max(self.lo, -amax), min(self.hi, amax)

    def uint8_range(self, method: str, params: dict) -> tuple[float, float] | None:
        """The range of a non-negative tensor on the uint8 grid (255 levels over [0, hi]) where it differs from
        :meth:`range` (mse: the error it minimises depends on the step); None otherwise."""
        if method != "mse" or self.top is None or self.lo < 0 or self.lo == math.inf:
            return None
        amax = min(mse_amax(self.hist, self.top, params.get("uint8_levels", UINT8_LEVELS)), self.hi)
        return self.lo, amax



def mse_amax(hist: np.ndarray, top: float, levels: int = INT8_LEVELS, max_candidates: int = 512) -> float:
    """The threshold t (a bin edge) minimising Σ_bins count·err(t): err = (t/levels)²/12 for a bin centre ≤ t
    (rounding noise), (centre − t)² beyond (clipping). Candidates every ``len(hist)/max_candidates`` bins, and the
    right edge of the last non-empty bin (= min/max) always."""
    n = len(hist)
    nz = np.flatnonzero(hist)
    if nz.size == 0:
        return 0.0
    last = int(nz.max()) + 1
    width = top / n
    centres = (np.arange(last) + 0.5) * width
    h = hist[:last].astype(np.float64)
    stride = max(1, last // max_candidates)
    cand = np.unique(np.append(np.arange(stride, last + 1, stride), last)) * width  # thresholds
    inside = centres[None, :] <= cand[:, None]
    step = cand / levels
    err = np.where(inside, (step[:, None] ** 2) / 12.0, (centres[None, :] - cand[:, None]) ** 2) @ h
    return float(cand[int(np.argmin(err))])


def percentile_amax(hist: np.ndarray, top: float, percentile: float) -> float:
    cdf = np.cumsum(hist) / hist.sum()
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return (min(i, len(hist) - 1) + 1) * top / len(hist)  # right edge of the bin where the percentile falls


def entropy_amax(hist: np.ndarray, top: float, nq: int = QUANT_BINS, max_candidates: int = 512) -> float:
    """TensorRT's entropy calibration on a histogram of |x|.

    For each candidate threshold (a bin edge i ≥ nq): P = hist[:i] with everything beyond folded into the last
    bin; Q = hist[:i] merged into ``nq`` bins and spread back evenly over each group's non-empty bins. The
    threshold with the smallest KL(P‖Q) wins. Candidates are spaced so that at most ``max_candidates`` are tried
    (every 4th edge of 2048 bins: 0.2 % of the range).

    The first bin is set to the count of the second before the search (as NVIDIA's pytorch-quantization does):
    after a ReLU it holds every exact zero — often half of all values — and would otherwise dominate the KL, so
    the search picks a threshold that clips the positive tail (a ReLU range of 9.5 collapsed to 2.0).
    """
    hist = hist.copy()
    if len(hist) > 1:
        hist[0] = hist[1]
    n = len(hist)
    last = int(np.flatnonzero(hist).max()) + 1 if hist.any() else 0
    if last <= nq:  # all data within the first nq bins: nothing to clip
        return last * top / n
    total = hist.sum()
    csum = np.cumsum(hist)
    stride = max(1, (last - nq) // max_candidates)
    best_i, best_kl = last, math.inf
    h = hist.astype(np.float64)
    for i in range(nq, last + 1, stride):
        p = h[:i].copy()
        p[-1] += total - csum[i - 1]
        nz = h[:i] != 0
        group = (np.arange(i) * nq) // i
        sums = np.bincount(group, weights=h[:i], minlength=nq)
        counts = np.bincount(group, weights=nz, minlength=nq)
        q = np.where(nz, sums[group] / np.maximum(counts[group], 1), 0.0)
        mask = p > 0
        if np.any(q[mask] == 0):
            continue
        p_n = p[mask] / p.sum()
        q_n = q[mask] / q.sum()
        kl = float(np.sum(p_n * np.log(p_n / q_n)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * top / n

