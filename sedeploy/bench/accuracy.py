"""How far each engine's predictions drift from the FP32 reference, and a gate for CI.

A deployment engine (FP16, INT8, a fused graph) should classify like the model it came from. Two kinds of figure
answer that, and both are reported because they fail differently:

- **With labels**: top-1 / top-5 accuracy per engine, the drop in top-1 points against the reference, and the
  *flips* — images the reference got right and the engine wrong (right→wrong), and the reverse (wrong→right).
  A drop of 0.1 points can hide 30 flips each way; the flips show the real disturbance.
- **Without labels** (any folder of photos): top-1 agreement with the reference, mean and max KL divergence
  KL(softmax(reference) ‖ softmax(engine)) in nats, and max |Δlogit|. Agreement needs no ground truth and is the
  figure that matters for "did quantisation change the model".

Softmax and KL are computed in float64 from log-softmax (stable for large logits; :mod:`sedeploy.metrics`). Argmax ties resolve to the
lowest class index, as ``numpy.argmax`` does, identically for reference and engine. Top-5 needs ≥ 5 classes
(None otherwise). Non-finite logits are counted per engine: a NaN row is a broken engine, not a rounding
difference, so it counts as a disagreement and as wrong (an all-NaN model scores 0 %, never "100 % agreement").
:class:`Drift` gathers the figures chunk by chunk, so a folder of any size is scored in bounded memory.

:func:`check_budget` turns the figures into a pass/fail list for CI.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.metrics import kl_divergence

__all__ = ["Drift", "engine_accuracy", "compare_engines", "check_budget", "nonfinite_violations"]


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


class Drift:
    """The drift figures of one engine against the reference, gathered chunk by chunk (:meth:`add`), so that an
    image folder of any size is scored in bounded memory: per image only its top-5 class indices, whether its
    rows are finite, its KL and its |Δlogit| row maximum and sum are kept (a few dozen bytes), never the logits.
    The labels are applied at the end (:meth:`result`). The figures do not depend on how the images were chunked.

    Non-finite outputs (NaN/Inf) are a broken engine, not a rounding difference: an image whose engine (or
    reference) row is not finite counts as a disagreement and as wrong, is counted in ``nonfinite_images``, and
    is left out of KL and |Δlogit| (None when no image is finite)."""

    def __init__(self) -> None:
        self.n = 0
        self.classes: int | None = None
        self.nonfinite = 0
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ref_top", "eng_top", "ref_ok", "eng_ok", "kl",
                                                                       "diff_max", "diff_sum")}

    def add(self, reference: np.ndarray, engine: np.ndarray) -> None:
        """One chunk of images: the reference's and the engine's logits, both images × classes."""
        ref = _check_logits("reference", reference, None)
        if self.classes is not None and ref.shape[1] != self.classes:
            raise SedeployError(f"Logits of the reference have {ref.shape[1]} classes in this chunk, {self.classes} "
                                "before.", fix="score every chunk with the same model")
        eng = _check_logits("engine", engine, ref.shape)
        self.classes = ref.shape[1]
        k = min(5, self.classes)
        ref_ok, eng_ok = np.isfinite(ref).all(axis=1), np.isfinite(eng).all(axis=1)
        finite = ref_ok & eng_ok
        parts = self._parts
        parts["ref_top"].append(np.argsort(-ref, axis=1, kind="stable")[:, :k].astype(np.int32))
        parts["eng_top"].append(np.argsort(-eng, axis=1, kind="stable")[:, :k].astype(np.int32))
        parts["ref_ok"].append(ref_ok)
        parts["eng_ok"].append(eng_ok)
        parts["kl"].append(kl_divergence(ref[finite], eng[finite]))
        diff = np.abs(ref[finite].astype(np.float64) - eng[finite].astype(np.float64))
        parts["diff_max"].append(diff.max(axis=1) if diff.size else np.zeros(0))
        parts["diff_sum"].append(diff.sum(axis=1))
        self.nonfinite += int((~np.isfinite(eng)).sum())
        self.n += len(ref)

    def result(self, labels: np.ndarray | None = None) -> dict[str, Any]:
        """The figures (see :func:`engine_accuracy`) over every image added; ``labels``: one per image."""
        if not self.n:
            raise SedeployError("No images were scored.", expected="logits of at least one image")
        p = {k: np.concatenate(v) for k, v in self._parts.items()}
        ref_top1, eng_top1 = p["ref_top"][:, 0], p["eng_top"][:, 0]
        finite = p["ref_ok"] & p["eng_ok"]
        agree = (ref_top1 == eng_top1) & finite
        kl, n_finite = p["kl"], int(finite.sum())
        out: dict[str, Any] = {
            "n_images": int(self.n), "labelled": labels is not None,
            "top1_agreement_pct": _pct(agree), "disagreements": int((~agree).sum()),
            "mean_kl": float(kl.mean()) if n_finite else None, "max_kl": float(kl.max()) if n_finite else None,
            "max_abs_logit_diff": float(p["diff_max"].max()) if n_finite else None,
            "mean_abs_logit_diff": float(p["diff_sum"].sum() / (n_finite * self.classes)) if n_finite else None,
            "nonfinite": int(self.nonfinite), "nonfinite_images": int((~p["eng_ok"]).sum()),
            "reference_nonfinite_images": int((~p["ref_ok"]).sum()),
        }
        if labels is not None:
            lab = _check_labels(labels, self.n, int(self.classes))
            ref_ok, eng_ok = (ref_top1 == lab) & p["ref_ok"], (eng_top1 == lab) & p["eng_ok"]
            top5 = self.classes >= 5
            out.update({
                "top1_pct": _pct(eng_ok),
                "top5_pct": _pct((p["eng_top"] == lab[:, None]).any(axis=1) & p["eng_ok"]) if top5 else None,
                "reference_top1_pct": _pct(ref_ok),
                "reference_top5_pct": (_pct((p["ref_top"] == lab[:, None]).any(axis=1) & p["ref_ok"])
                                       if top5 else None),
                "top1_drop_pts": _pct(ref_ok) - _pct(eng_ok),
                "flips_right_to_wrong": int((ref_ok & ~eng_ok).sum()),
                "flips_wrong_to_right": int((~ref_ok & eng_ok).sum()),
            })
        return out


def engine_accuracy(reference: np.ndarray, engine: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """All drift figures of one engine against the reference (both N×C); see the module docstring and
    :class:`Drift` (which gathers the same figures chunk by chunk).

    Keys: n_images, labelled, top1_agreement_pct, disagreements, mean_kl, max_kl, max_abs_logit_diff,
    mean_abs_logit_diff, nonfinite (values), nonfinite_images, reference_nonfinite_images; with labels also
    top1_pct, top5_pct, reference_top1_pct, reference_top5_pct, top1_drop_pts (reference − engine),
    flips_right_to_wrong, flips_wrong_to_right. KL and |Δlogit| figures are None when no image is finite.
    """
    drift = Drift()
    drift.add(reference, engine)
    return drift.result(labels)


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


def nonfinite_line(name: str, acc: Mapping[str, Any]) -> str:
    """One line naming an engine whose outputs were not finite, and on how many images."""
    images = acc.get("nonfinite_images")
    return (f"{name}: {acc['nonfinite']} non-finite output value(s) (NaN/Inf)"
            + (f" on {images} of {acc.get('n_images')} images" if images is not None else "")
            + " — a broken engine; those images count as wrong and as disagreeing")


def nonfinite_violations(results: Mapping[str, Any]) -> list[str]:
    """:func:`nonfinite_line` for every engine (the reference included) with non-finite outputs; [] when none."""
    return [nonfinite_line(n, a) for n, a in _accuracy_by_engine(results).items() if a.get("nonfinite")]


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
            violations.append(nonfinite_line(name, acc))
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
