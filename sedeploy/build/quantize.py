"""The INT8 stages: calibration, the INT8 artifacts (each flavour; to an accuracy budget when one is asked; the
TensorRT form checked against TensorRT's Q/DQ rules), and the INT8 check against FP32 on held-out images."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sedeploy import int8_check, quantize
from sedeploy.artifacts import Artifact, artifact_path
from sedeploy.build.inputs import default_calib_dir
from sedeploy.build.options import BuildOptions
from sedeploy.build.result import BuildResult
from sedeploy.checks import check_trt_qdq, format_report
from sedeploy.errors import VerificationError
from sedeploy.int8_budget import DEFAULT_FALLBACK_ORDER, heldout_split, quantize_to_budget
from sedeploy.int8_check import confirm_unseen, refuse_seen_val
from sedeploy.labels import resolve_labels_offset
from sedeploy.onnxcore import run_model
from sedeploy.preprocess import Preprocess, find_images, load_batch, smooth_noise

log = logging.getLogger("sedeploy")


def heldout_images(opt: BuildOptions, folder: Path, pp: Preprocess, num_classes: int):
    """(images, labels or None, relative calibration paths to exclude, description) for the INT8 budget."""
    cal, offset = opt.calibration, opt.source.label_offset
    if opt.budget.val is not None:
        found = find_images(opt.budget.val, what="held-out image folder (--val)")
        root, paths, exclude = found.root, found.paths, set()
        refuse_seen_val(paths, root, folder, count=cal.calib_count, seed=cal.calib_seed)
        what = f"{len(paths)} images of --val {root}"
    else:
        root, paths, exclude = heldout_split(folder, seed=cal.calib_seed)
        what = f"{len(paths)} images held out of --calib {root} (seeded split; not calibrated on)"
    images, loaded = load_batch(paths, pp, progress=opt.progress, what=f"held-out image folder '{root}'")
    labels = resolve_labels_offset(loaded, root, num_classes=num_classes, label_offset=offset or 0) \
        if any(len(p.relative_to(root).parts) > 1 for p in loaded) else None
    if labels is not None and num_classes == 1001 and offset is None:
        log.warning("The model has 1001 outputs and no --label-offset was given: if output 0 is a background "
                    "class, pass --label-offset 1 (top-1 of the held-out images is scored against the wrong "
                    "classes otherwise).")
    return images, None if labels is None else labels.indices, exclude, what


def int8_stage(fp32_path: Path, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> None:
    cal, bud, prec = opt.calibration, opt.budget, opt.precision
    if cal.calib is None:
        log.info("--int8 without --calib: calibrating on the %s images shipped in %s (pass --calib DIR with "
                 "images like the deployment data for better ranges)", "sample", default_calib_dir())
        res.notes.append(f"calibrated on the shipped sample images in {default_calib_dir()} (no --calib given)")
    folder = Path(cal.calib) if cal.calib else default_calib_dir()
    budget = None
    exclude: set[str] = set()
    if bud.enabled:
        budget = bud.budget()
        num_classes = int(run_model(fp32_path, smooth_noise(1, pp.shape, seed=1)).shape[1])
        held_x, held_y, exclude, held_what = heldout_images(opt, folder, pp, num_classes)
        budget.check_images(len(held_x))  # too few images for --budget-confidence: refused before calibrating
        res.int8_budget = {"budget": {"max_top1_drop": bud.max_top1_drop, "min_agreement": bud.min_agreement,
                                      "confidence": bud.budget_confidence},
                           "heldout": held_what, "labelled": held_y is not None, "flavours": {}}
        res.int8_pending = {"images": held_x, "what": held_what, "pp": pp}
    else:
        held = int8_check.plan(folder, val=bud.val, count=cal.calib_count, seed=cal.calib_seed, method=cal.method)
        res.int8_pending = {"held": held, "pp": pp}
        if isinstance(held, int8_check.HeldOut):
            exclude = held.exclude
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in {"method": cal.calib_method, "count": cal.calib_count,
                                "batch_size": cal.calib_batch}.items() if v is not None}
    calib = quantize.calibrate(fp32_path, folder, seed=cal.calib_seed, cache_path=cal.calib_cache,
                               progress=opt.progress, preprocess=pp, exclude=exclude, **kwargs)
    res.timings["calibrate_s"] = round(time.perf_counter() - t0, 2)
    res.calibration = {"folder": str(folder), "images": len(calib.images), "skipped": list(calib.skipped),
                       "method": calib.method, "params": calib.params, "seed": cal.calib_seed,
                       "cache_hit": calib.cache_hit, "cache_path": calib.cache_path, "key": calib.key,
                       "seconds": res.timings["calibrate_s"], "held_out": len(exclude)}
    if calib.cache_hit:
        res.calibration["computed_seconds"] = calib.seconds  # what the cached run took
    if budget is None and not isinstance(res.int8_pending["held"], str):
        confirm_unseen(res.int8_pending["held"], calib.images)
    se = quantize.DEFAULT_SE_POLICY if prec.se_int8 is None else prec.se_int8
    # the OpenVINO form only when OpenVINO engines are built (ORT and TensorRT have their own forms)
    for flavour in ("trt", "cpu", *(("ov",) if opt.backend == "openvino" else ())):
        t0 = time.perf_counter()
        path = artifact_path(out, stem, f"int8-{flavour}")
        # the TensorRT flavour is the FP16 graph with Q/DQ: it takes the FP16 artifact's keep-FP32 policy
        keep = prec.keep_fp32 if flavour == "trt" else None
        if budget is not None:
            report, brep = quantize_to_budget(fp32_path, calib, path, flavour=flavour, images=held_x, labels=held_y,
                                              budget=budget, se=se, max_fallback=bud.max_fallback,
                                              threads=opt.engine.threads, keep_fp32=keep,
                                              order=bud.fallback_order or DEFAULT_FALLBACK_ORDER)
            res.int8_budget["flavours"][flavour] = brep.as_dict()
        else:
            report = quantize.quantize_model(fp32_path, calib, path, flavour=flavour, se=se, keep_fp32=keep)
        entry = Artifact(res.published(path), "int8", flavour, {**report.as_dict(), "path": str(res.published(path))})
        if flavour == "trt":
            check = check_trt_qdq(str(path))
            res.validation = {**check.as_dict(), "model": str(res.published(path))}
            if not check.ok:
                path.unlink(missing_ok=True)
                raise VerificationError(f"The TensorRT INT8 artifact breaks TensorRT's Q/DQ rules; it was not "
                                        f"kept.\n{format_report(check)}",
                                        fix="report this as a bug; the CPU flavour and FP16 are unaffected")
        res.timings[f"int8_{flavour}_s"] = round(time.perf_counter() - t0, 2)
        res.artifacts.append(entry)


def int8_check_stage(res: BuildResult, opt: BuildOptions, stage: Path) -> None:
    """INT8 agreement with FP32 on held-out images (sedeploy.int8_check), on the runtime each artifact runs on;
    warns below ``opt.precision.warn_agreement``. The budget's own figures are reused where it measured on that
    runtime. The artifacts are read in the staging folder ``stage``."""
    pending, res.int8_pending = res.int8_pending, None
    ints = [a for a in res.artifacts if a.precision == "int8" and a.flavour]
    if pending is None or not ints:
        return
    t0 = time.perf_counter()
    warn = opt.precision.warn_agreement
    floor = int8_check.DEFAULT_WARN_AGREEMENT if warn is None else warn
    held = pending.get("held")
    if isinstance(held, str):
        said = (f"WARNING: INT8 agreement with FP32 not measured: {held}. Pass --val DIR (held-out images like "
                "the deployment data) to check it")
        log.warning(said.removeprefix("WARNING: "))
        res.notes.append(said)
        res.int8_check = {"measured": False, "reason": held, "warn_below_pct": floor}
        return
    ov_built = {e["kind"] for e in res.engines if e["backend"] == "openvino"}
    fp32 = stage / next(a.path for a in res.artifacts if a.precision == "fp32").name
    budget = (res.int8_budget or {}).get("flavours") or {}
    figures, entries, notes = {}, [], {}
    for a in ints:
        runtime, note = int8_check.runtime_for(a.kind, openvino_ok=a.kind in ov_built)
        if note:
            notes[a.kind] = note
        if a.flavour in budget and runtime == "ort":  # the budget measured it on ONNX Runtime CPU: reused
            r = budget[a.flavour]["result"]
            figures[a.kind] = {**{k: r[k] for k in ("n", "agree", "agreement_pct", "agreement_lcb_pct")},
                               "runtime": runtime, "from": "the INT8 budget's held-out measurement"}
        else:
            entries.append((a.kind, stage / a.path.name, runtime))
    if held is not None:
        images, _ = load_batch(held.paths, pending["pp"], progress=opt.progress,
                               what=f"held-out image folder '{held.root}'")
        heldout = {**held.as_dict(), "images": len(images)}
    else:  # the budget's held-out images
        images = pending["images"]
        heldout = {"source": "budget", "what": pending["what"], "images": len(images)}
    if entries:
        for kind, m in int8_check.measure(fp32, entries, images, threads=opt.engine.threads).items():
            figures[kind] = {**m, "runtime": dict((k, r) for k, _, r in entries)[kind]}
    for kind, m in figures.items():
        m["below_warn"] = m["agreement_pct"] < floor
        if kind in notes:
            m["note"] = notes[kind]
        if m["below_warn"]:
            said = int8_check.warning_text(kind, m, floor, m["runtime"],
                                           random_weights=(res.weights or "").startswith("random"))
            log.warning("INT8 check: %s", said)
            res.notes.append(f"WARNING: {said}")
    res.timings["int8_check_s"] = round(time.perf_counter() - t0, 2)
    res.int8_check = {"measured": True, "heldout": heldout, "warn_below_pct": floor,
                      "reference": "the FP32 artifact on ONNX Runtime CPU",
                      "artifacts": {a.kind: figures[a.kind] for a in ints if a.kind in figures},
                      "seconds": res.timings["int8_check_s"]}
