"""How far each engine's predictions drift from the FP32 reference, and a gate for CI.

A deployment engine (FP16, INT8, a fused graph) should classify like the model it came from. Two kinds of figure
answer that, and both are reported because they fail differently:

- **With labels**: top-1 / top-5 accuracy per engine, the drop in top-1 points against the reference, and the
  *flips* — images the reference got right and the engine wrong (right→wrong), and the reverse (wrong→right).
  A drop of 0.1 points can hide 30 flips each way; the flips show the real disturbance.
- **Without labels** (any folder of photos): top-1 agreement with the reference, mean and max KL divergence
  KL(softmax(reference) ‖ softmax(engine)) in nats, and max |Δlogit|. Agreement needs no ground truth and is the
  figure that matters for "did quantisation change the model".

Softmax and KL are computed in float64 from log-softmax (stable for large logits). Argmax ties resolve to the
lowest class index, as ``numpy.argmax`` does, identically for reference and engine. Top-5 needs ≥ 5 classes
(None otherwise). Non-finite logits are counted per engine: a NaN row is a broken engine, not a rounding
difference.

:func:`check_budget` turns the figures into a pass/fail list for CI.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sedeploy.errors import SedeployError

__all__ = ["topk_correct", "log_softmax", "kl_divergence", "engine_accuracy", "compare_engines", "check_budget"]


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


def _pct(mask: np.ndarray) -> float:
    return float(mask.mean() * 100.0)


def _check_logits(name: str, logits: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise SedeployError(f"Logits of '{name}' have shape {arr.shape}.", expected="a 2-D array images × classes")
    if shape is not None and arr.shape != shape:
        raise SedeployError(f"Logits of '{name}' have shape {arr.shape}, the reference's are {shape}.",
                            fix="run every engine on the same images, with a model of the same class count")
    if not np.issubdtype(arr.dtype, np.floating):
        raise SedeployError(f"Logits of '{name}' are {arr.dtype}.", expected="floating-point logits")
    return arr


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise SedeployError(f"Labels have shape {lab.shape} and dtype {lab.dtype}.",
                            expected=f"{n} integer class indices, one per image")
    bad = np.flatnonzero((lab < 0) | (lab >= num_classes))
    if bad.size:
        raise SedeployError(f"{bad.size} label(s) lie outside 0…{num_classes - 1} (first: image {bad[0]} → "
                            f"{lab[bad[0]]}).", fix="check the labels' class order against the model's")
    return lab


def engine_accuracy(reference: np.ndarray, engine: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """All drift figures of one engine against the reference (both N×C); see the module docstring.

    Keys: n_images, labelled, top1_agreement_pct, disagreements, mean_kl, max_kl, max_abs_logit_diff,
    mean_abs_logit_diff, nonfinite; with labels also top1_pct, top5_pct, reference_top1_pct,
    reference_top5_pct, top1_drop_pts (reference − engine), flips_right_to_wrong, flips_wrong_to_right.
    """
    ref = _check_logits("reference", reference, None)
    eng = _check_logits("engine", engine, ref.shape)
    n, c = ref.shape
    finite = np.isfinite(eng).all(axis=1) & np.isfinite(ref).all(axis=1)
    ref_top1, eng_top1 = ref.argmax(axis=1), eng.argmax(axis=1)
    agree = ref_top1 == eng_top1
    diff = np.abs(ref.astype(np.float64) - eng.astype(np.float64))
    kl = kl_divergence(ref[finite], eng[finite]) if finite.any() else np.array([np.nan])
    out: dict[str, Any] = {
        "n_images": int(n), "labelled": labels is not None,
        "top1_agreement_pct": _pct(agree), "disagreements": int((~agree).sum()),
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "max_abs_logit_diff": float(diff[finite].max()) if finite.any() else float("nan"),
        "mean_abs_logit_diff": float(diff[finite].mean()) if finite.any() else float("nan"),
        "nonfinite": int((~np.isfinite(eng)).sum()),
    }
    if labels is not None:
        lab = _check_labels(labels, n, c)
        ref_ok, eng_ok = ref_top1 == lab, eng_top1 == lab
        top5 = c >= 5
        out.update({
            "top1_pct": _pct(eng_ok), "top5_pct": _pct(topk_correct(eng, lab, 5)) if top5 else None,
            "reference_top1_pct": _pct(ref_ok),
            "reference_top5_pct": _pct(topk_correct(ref, lab, 5)) if top5 else None,
            "top1_drop_pts": _pct(ref_ok) - _pct(eng_ok),
            "flips_right_to_wrong": int((ref_ok & ~eng_ok).sum()),
            "flips_wrong_to_right": int((~ref_ok & eng_ok).sum()),
        })
    return out


def compare_engines(reference_name: str, logits: Mapping[str, np.ndarray],
                    labels: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Figures for every engine in ``logits`` (name → N×C) against ``logits[reference_name]``.

    The reference gets its own entry too (agreement 100 %, KL 0, its own accuracy), so one table shows all.
    """
    if reference_name not in logits:
        raise SedeployError(f"The reference engine '{reference_name}' has no logits.",
                            expected=f"one of {', '.join(logits) or '(none)'}",
                            fix="include the FP32 reference in the engines compared")
    ref = _check_logits(reference_name, logits[reference_name], None)
    results = {}
    for name, eng in logits.items():
        _check_logits(name, eng, ref.shape)
        figures = engine_accuracy(ref, eng, labels)
        figures["reference"] = reference_name
        results[name] = figures
    return results


def _accuracy_by_engine(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Accept either compare_engines() output or a full results dict ({"engines": [{name, accuracy}, …]})."""
    if isinstance(results.get("engines"), list):
        return {e["name"]: e["accuracy"] for e in results["engines"] if e.get("accuracy")}
    return dict(results)


def check_budget(results: Mapping[str, Any], max_top1_drop_pts: float | None = None,
                 min_agreement_pct: float | None = None) -> list[str]:
    """Violations of an accuracy budget, one readable line each naming the engine and the figure; [] = pass.

    ``results``: :func:`compare_engines` output or a full benchmark results dict. The reference engine itself is
    not gated. A top-1 budget without labels is an error (it could never fail); so is a budget when no engine has
    accuracy figures. With any budget set, non-finite logits are a violation too.
    """
    if max_top1_drop_pts is None and min_agreement_pct is None:
        return []
    if max_top1_drop_pts is not None and not max_top1_drop_pts >= 0:
        raise SedeployError(f"Top-1 drop budget {max_top1_drop_pts} points.",
                            expected="a number of percentage points ≥ 0, e.g. 0.5")
    if min_agreement_pct is not None and not 0 <= min_agreement_pct <= 100:
        raise SedeployError(f"Agreement budget {min_agreement_pct} %.", expected="a percentage between 0 and 100")
    by_engine = _accuracy_by_engine(results)
    gated = {n: a for n, a in by_engine.items() if a.get("reference", n) != n}
    if not gated:
        raise SedeployError("An accuracy budget was given but no engine was compared with a reference.",
                            fix="benchmark at least one engine besides the FP32 reference, with accuracy enabled")
    violations = []
    for name, acc in gated.items():
        ref = acc.get("reference", "reference")
        if acc.get("nonfinite"):
            violations.append(f"{name}: {acc['nonfinite']} non-finite logit value(s) (NaN/Inf)")
        if max_top1_drop_pts is not None:
            if not acc.get("labelled"):
                raise SedeployError(f"A top-1 drop budget needs labels, but '{name}' was measured without them.",
                                    fix="pass a labelled image folder (synset/index class folders or a labels "
                                        "file), or gate on agreement with the reference instead")
            drop = acc["top1_drop_pts"]
            if drop > max_top1_drop_pts:
                violations.append(f"{name}: top-1 {acc['top1_pct']:.2f}% is {drop:.2f} points below {ref} "
                                  f"({acc['reference_top1_pct']:.2f}%), budget {max_top1_drop_pts:g} points "
                                  f"({acc['flips_right_to_wrong']} right→wrong, {acc['flips_wrong_to_right']} "
                                  "wrong→right)")
        if min_agreement_pct is not None:
            agree = acc["top1_agreement_pct"]
            if agree < min_agreement_pct:
                violations.append(f"{name}: top-1 agreement with {ref} {agree:.2f}% "
                                  f"({acc['disagreements']} of {acc['n_images']} images differ), budget ≥ "
                                  f"{min_agreement_pct:g}%")
    return violations
