"""Never a silently degraded INT8 engine: every INT8 artifact's top-1 agreement with FP32 on held-out images.

``build-engine --int8`` measures each INT8 artifact it writes against the FP32 artifact on images calibration did
not see, on the runtime that will run it (OpenVINO CPU for ``int8-ov``; ONNX Runtime CPU for ``int8-cpu`` and,
since a CPU build has no GPU, for ``int8-trt``, whose FP16 parts ONNX Runtime's CPU provider computes in FP32 on
most CPUs), and reports the agreement with its one-sided 95 % Wilson lower bound and the image count. Below the
floor (``--warn-agreement``, default :data:`DEFAULT_WARN_AGREEMENT` %) it warns on stderr and in the result; the
build still succeeds (``--min-agreement`` is the hard budget that falls layers back to float or fails).

Which images (:func:`plan`), at most :data:`MAX_IMAGES` of them so the check costs seconds, not minutes:

- ``--val DIR``: a seeded subset of that folder; calibration is unchanged.
- a ``--calib`` folder holding more images than calibration uses (``--calib-count``, default 256): a seeded subset
  of the images calibration did not pick; calibration is unchanged.
- a smaller ``--calib`` folder (the shipped ``calib/`` holds 27 photos): a seeded quarter is held out and
  calibration uses the rest (said in the result, with how to avoid it: ``--val DIR``), as long as calibration keeps
  the images its method needs and at least :data:`MIN_IMAGES` are held out; otherwise the check is not run, and
  that is said as a warning.

With an accuracy budget (``--min-agreement`` / ``--max-top1-drop``) the budget's own held-out figures are reported
instead of measuring again (they were measured on ONNX Runtime CPU; the OpenVINO form is measured again on OpenVINO,
on the same images).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sedeploy import quantize
from sedeploy.backends.openvino import OpenVinoModelRunner
from sedeploy.backends.ort import cpu_computes_fp16
from sedeploy.errors import SedeployError
from sedeploy.int8_budget import heldout_count, heldout_split
from sedeploy.metrics import REPORT_CONFIDENCE, as_logits, metrics
from sedeploy.onnxcore import cpu_session, load_onnx, output_kind, pad_to_batch, run_model, sha256_file
from sedeploy.preprocess import find_images

log = logging.getLogger("sedeploy")

#: top-1 agreement (%) with FP32 below which an INT8 artifact is warned about (``--warn-agreement``)
DEFAULT_WARN_AGREEMENT = 97.0
#: most held-out images measured (the check's cost grows with it; 256 shows 99 % agreement to about ±1 pt)
MAX_IMAGES = 256
#: fewest images held out of a small --calib folder; with fewer the check is not run (and that is said)
MIN_IMAGES = 4
#: images per inference call (bounds memory at 224 px: 32 × 3 × 224 × 224 floats)
BATCH = 32
#: the runtimes the check runs an artifact on
RUNTIMES = {"openvino": "OpenVINO CPU", "ort": "ONNX Runtime CPU"}


def check_warn_agreement(pct) -> None:
    """Refuse a ``--warn-agreement`` that is not a percentage."""
    if pct is None:
        return
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not (math.isfinite(pct) and 0 <= pct <= 100):
        raise SedeployError(f"--warn-agreement {pct} is not valid.", expected="a percentage from 0 to 100, e.g. 97",
                            fix=f"omit it (default {DEFAULT_WARN_AGREEMENT:g}); 0 never warns")


@dataclass
class HeldOut:
    """The images the check measures on, and what calibration must not see."""

    root: Path
    paths: list[Path]
    source: str  # "val" | "unpicked" (calibration did not pick them) | "split" (held out of a small --calib)
    what: str  # said in the summary
    exclude: set[str] = field(default_factory=set)  # relative paths calibration must not see ("split")
    calib_before: int | None = None  # "split": images calibration would have used without the split
    calib_after: int | None = None  # "split": images left to calibrate on

    def as_dict(self) -> dict:
        d = {"source": self.source, "folder": str(self.root), "images": len(self.paths), "what": self.what,
             "max_images": MAX_IMAGES}
        if self.source == "split":
            d.update(calibration_images_before=self.calib_before, calibration_images_after=self.calib_after)
        return d


def _pick(paths: list[Path], k: int, seed: int) -> list[Path]:
    """A seeded subset of ``k`` of ``paths`` (all when there are no more), in their order."""
    if len(paths) <= k:
        return list(paths)
    keep = np.sort(np.random.default_rng(seed + 104729).choice(len(paths), size=k, replace=False))
    return [paths[i] for i in keep]


def plan(folder: str | Path, *, val: str | Path | None, count: int | None, seed: int, method: str) -> HeldOut | str:
    """The held-out images of the check, chosen before calibration; or, when a calibration folder is too small to
    split, the reason the check is not run."""
    if val is not None:
        found = find_images(val, what="held-out image folder (--val)")
        paths = _pick(found.paths, MAX_IMAGES, seed)
        refuse_seen_val(paths, found.root, folder, count=count, seed=seed)
        return HeldOut(found.root, paths, "val", f"{len(paths)} of the {len(found.paths)} images of --val {found.root}")
    count = quantize.DEFAULT_COUNT if count is None else count
    found = find_images(folder, what="calibration image folder")
    n = len(found.paths)
    if n > count:
        root, used = quantize.select_images(folder, count, seed)
        used_set = set(used)
        rest = [p for p in found.paths if p not in used_set]
        paths = _pick(rest, MAX_IMAGES, seed)
        return HeldOut(root, paths, "unpicked",
                       f"{len(paths)} images of {root} that calibration did not pick ({count} of {n} calibrated on)")
    need = quantize.MIN_IMAGES[method]
    k = heldout_count(n, min_heldout=MIN_IMAGES, most=MAX_IMAGES)
    if n - k < need:
        return (f"the calibration folder {found.root} holds {n} images: too few to hold {k} out and still calibrate "
                f"on the {need} the {method} method needs")
    root, paths, exclude = heldout_split(folder, seed=seed, min_heldout=MIN_IMAGES, min_rest=need, most=MAX_IMAGES)
    return HeldOut(root, paths, "split",
                   f"{len(paths)} images held out of {root} (a seeded quarter; calibration used the other "
                   f"{n - len(paths)} of {n} — pass --val DIR to calibrate on all {n})",
                   exclude=exclude, calib_before=n, calib_after=n - len(paths))


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def refuse_seen_val(val_paths: list[Path], val_root: Path, folder: str | Path, *, count: int | None,
                    seed: int) -> None:
    """``--val`` images must be held out: none may be an image calibration uses (the same file, a link to it, or a
    copy with the same contents), or every figure measured on them would flatter the INT8 artifact."""
    count = quantize.DEFAULT_COUNT if count is None else count
    _, calibrated = quantize.select_images(folder, count, seed)
    by_size: dict[int, list[Path]] = {}
    for c in calibrated:
        by_size.setdefault(c.stat().st_size, []).append(c)
    seen = [v for v in val_paths if any(_same_file(v, c) for c in by_size.get(v.stat().st_size, ()))]
    if seen:
        raise SedeployError(f"--val {val_root}: {len(seen)} of its {len(val_paths)} images are images calibration "
                            f"uses from --calib {folder} (e.g. {', '.join(p.name for p in seen[:3])}), so they are "
                            "not held out.",
                            expected="held-out images that calibration never sees",
                            fix="pass a --val folder with other images, or omit --val (a part of --calib that "
                                "calibration does not use is held out then)")


def confirm_unseen(held: HeldOut, calibrated: list[str]) -> None:
    """The held-out images were not calibrated on (``calibrated``: relative paths, as the calibration lists them)."""
    if held.source == "val":
        return
    seen = {p.relative_to(held.root).as_posix() for p in held.paths} & set(calibrated)
    if seen:
        raise SedeployError(f"{len(seen)} of the INT8 check's held-out images were calibrated on "
                            f"({', '.join(sorted(seen)[:3])}).", fix="report this as a bug in sedeploy")


def runtime_for(kind: str, *, openvino_ok: bool) -> tuple[str, str | None]:
    """(runtime key of :data:`RUNTIMES`, a note or None) for an INT8 artifact of ``kind``. ``openvino_ok``: its
    OpenVINO engine was built (else OpenVINO could not compile it and ONNX Runtime runs that precision)."""
    if kind == "int8-ov":
        if openvino_ok:
            return "openvino", None
        return "ort", "OpenVINO could not compile it, so it was measured on ONNX Runtime CPU"
    if kind == "int8-trt":
        return "ort", ("TensorRT runs it on a GPU; measured on ONNX Runtime CPU, which computes its FP16 parts in "
                       + ("FP16" if cpu_computes_fp16() else "FP32"))
    return "ort", None


def logits(path: str | Path, runtime: str, images: np.ndarray, *, threads: int | None, precision: str) -> np.ndarray:
    """The first output of the model at ``path`` on ``images``, run on ``runtime`` in batches of :data:`BATCH`
    (a fixed-batch model in chunks of its batch)."""
    if runtime == "openvino":
        with OpenVinoModelRunner(path, precision=precision, threads=threads) as r:
            fixed = r.input_shape[0] if isinstance(r.input_shape[0], int) else None
            step = fixed or BATCH
            outs = [r.infer(pad_to_batch(images[i:i + step], fixed))[:len(images[i:i + step])]
                    for i in range(0, len(images), step)]
        return np.concatenate(outs)
    sess = cpu_session(path, threads=threads)
    return np.concatenate([run_model(sess, images[i:i + BATCH]) for i in range(0, len(images), BATCH)])


def measure(fp32_path: str | Path, entries: list[tuple[str, Path, str]], images: np.ndarray, *,
            threads: int | None, ref: np.ndarray | None = None) -> dict[str, dict]:
    """Agreement with FP32 of each ``(kind, artifact, runtime)`` on ``images`` (:func:`sedeploy.metrics.metrics`:
    counts, agreement, its Wilson lower bound). ``ref``: the FP32 logits when already computed."""
    kind = output_kind(load_onnx(fp32_path, weights=False, check=False))
    if ref is None:
        ref = as_logits(logits(fp32_path, "ort", images, threads=threads, precision="fp32"), kind)
    out = {}
    for name, path, runtime in entries:
        t0 = time.perf_counter()
        got = as_logits(logits(path, runtime, images, threads=threads, precision="int8"), kind)
        m = metrics(ref, got, None)
        out[name] = {k: m[k] for k in ("n", "agree", "agreement_pct", "agreement_lcb_pct", "mean_kl")}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def warning_text(kind: str, m: dict, floor: float, runtime: str, *, random_weights: bool = False) -> str:
    """The warning for an artifact below the floor: what was measured, and what to do."""
    return (f"{kind} agrees with FP32 on {m['agreement_pct']:.2f} % of {m['n']} held-out images "
            f"({REPORT_CONFIDENCE:.0%} lower bound {m['agreement_lcb_pct']:.2f} %) on {RUNTIMES[runtime]}, below "
            f"{floor:g} % (--warn-agreement): its engine answers differently from FP32 more often than that. "
            + ("These are random weights, whose logits sit close together, so rounding flips their top-1 often; "
               "a trained network's figure says more. " if random_weights else "")
            + f"To fix: --min-agreement {floor:g} falls the most sensitive layers back to float; calibrate on more "
              "images like the deployment data (--calib); or deploy FP32/FP16")
