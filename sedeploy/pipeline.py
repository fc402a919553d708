"""The build pipeline (`sedeploy build-engine`): an FP32 ONNX classifier → portable precision artifacts → backend engines.

Data flow (every step reported in the result, every file written atomically)::

    model.onnx ─ fuse SE ─▶ <stem>.fp32.onnx ─ FP16 rewrite ─▶ <stem>.fp16.onnx
                                  │
                                  └─ calibrate on images ─▶ <stem>.int8-trt.onnx  (TensorRT Q/DQ rules, validated)
                                                            <stem>.int8-cpu.onnx  (fastest ONNX Runtime CPU form)
                                                            <stem>.int8-ov.onnx   (OpenVINO form, --backend openvino)
    each artifact ─ backend ─▶ ONNX Runtime optimized graph (.ort-opt.onnx + .ort.json),
                               TensorRT plan (.plan + .trt.json) or OpenVINO model (.ov.xml + .ov.json)

Why the artifacts are ONNX files first: TensorRT 11 builds every network strongly typed, so the precision must be
in the graph (FP16 tensors, explicit Q/DQ). The same files run on ONNX Runtime anywhere, so a model calibrated on
a CPU machine is carried to a GPU machine and built there (``sedeploy build-engine ARTIFACT.onnx --backend trt``).
An input that is already FP16 or INT8 is such an artifact: only the engine is built from it.

``manifest.json`` in the output folder lists what was written; ``sedeploy bench OUTDIR`` reads it.

A build is all-or-nothing: every option is checked before any work, the run holds an exclusive lock on the output
folder (a second build into it is refused), everything is written into a staging folder inside it, and only a
complete set is published (moved in, manifest last, with Ctrl-C/SIGTERM/SIGHUP held back for those few renames).
Files the previous manifest listed that the new build did not write are removed, so the folder always holds exactly
one build. A failed or interrupted build leaves the previous set untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy.artifacts import MANIFEST, Artifact, artifact_path, artifact_stem
from sedeploy.backends import BACKENDS, BUILD_CHOICES, EngineOptions
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.fsutil import (atomic_write_text, clean_stale_partials, ensure_writable_dir, folder_lock, missing_dirs,
                             publish_staged, remove_empty_dirs, staging_folder)
from sedeploy.layout import Manifest
from sedeploy.onnxcore import META, check_threads, get_metadata, run_model, save_onnx, set_metadata
from sedeploy.preprocess import Preprocess

log = logging.getLogger("sedeploy")

#: fused vs unfused FP32 logits must agree to FUSION_RTOL × max|logit| (at least FUSION_ATOL). The pass computes
#: the same arithmetic, but ReduceMean → GlobalAveragePool sums in another order: on SE-ResNet-50 (|logit| ≈ 35)
#: that moves logits by 2.6e-5, less than ONNX Runtime's own optimization levels do to the unfused graph (3.3e-5).
FUSION_ATOL = 1e-5
FUSION_RTOL = 1e-5


@dataclass
class BuildOptions:
    """Everything `build-engine` can be asked; the defaults are the measured recommendations."""

    fp16: bool = False
    int8: bool = False
    fuse_se: bool = True
    backend: str = "auto"  # "auto": sedeploy.backends.default_cpu_backend() (OpenVINO when it imports, else ORT)
    calib: str | Path | None = None  # None: the shipped calib/ folder (said in the log)
    calib_method: str | None = None  # None: calibration.DEFAULT_METHOD
    calib_count: int | None = None  # None: calibration.DEFAULT_COUNT
    calib_seed: int = 0
    calib_batch: int | None = None
    calib_cache: str | Path | None = None
    se_int8: str | None = None  # None: int8.DEFAULT_SE_POLICY
    keep_fp32: str | None = None  # None: fp16.DEFAULT_KEEP_FP32
    threads: int | None = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_gib: float = 4.0
    timing_cache: str | Path | None = None
    preprocess: Preprocess | None = None  # None: from the model's metadata, else mmcls defaults at its input size
    progress: bool = True
    # accuracy-budgeted INT8 (sedeploy.int8_budget): either bound turns the budget on
    max_top1_drop: float | None = None  # top-1 points vs FP32 on held-out images (needs labels)
    min_agreement: float | None = None  # top-1 agreement with FP32, percent
    budget_confidence: float | None = None  # meet the budget with one-sided bounds at this confidence
    fallback_order: str | None = None  # sedeploy.int8_budget.FALLBACK_ORDERS; None: its default
    val: str | Path | None = None  # held-out images; None: a seeded split of the calibration folder
    label_offset: int = 0  # model output k + offset is dataset class k (1001-class models: 1)
    max_fallback: int | None = None  # most layers allowed back in float
    dynamic_batch: bool = False  # a fixed-batch model: make the batch dynamic (refused with the reason if unsafe)
    input_shape: tuple[int, int] | None = None  # (H, W) pinning a model's dynamic height and width
    warn_agreement: float | None = None  # INT8 check: warn below this top-1 agreement, %; None: int8_check default
    auto_backend: bool = False  # set by build_engines when --backend auto chose the backend (fallback allowed)


@dataclass
class BuildResult:
    source: str
    out_dir: str
    weights: str | None = None  # from the model's metadata: "random (seed 0)", "mmcls checkpoint x.pth (…)"
    se_blocks_found: int | None = None
    se_blocks_fused: int | None = None
    fusion: dict[str, Any] | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    engines: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    int8_budget: dict[str, Any] | None = None  # per flavour: sedeploy.int8_budget.BudgetReport
    shapes: dict[str, Any] | None = None  # input shape, batch handling, output kind
    canonical: dict[str, Any] | None = None  # sedeploy.passes.canonical.CanonicalReport of the input graph
    int8_check: dict[str, Any] | None = None  # INT8 agreement with FP32 on held-out images (sedeploy.int8_check)
    _int8_pending: Any = field(default=None, repr=False, compare=False)  # the check's images, until it runs

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["artifacts"] = [a.as_dict() for a in self.artifacts]
        return d


def default_calib_dir() -> Path:
    from sedeploy.export import DEFAULT_CALIB_DIR

    return DEFAULT_CALIB_DIR


def _positive(value, option: str, fix: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SedeployError(f"{option} {value} is not valid.", expected="a positive integer", fix=fix)


def _backend_purpose(backend: str) -> str:
    return (f"Building {BACKENDS[backend].label} engines (--backend {backend}); the portable ONNX artifacts can be "
            "written anywhere with --backend none and built where the backend is installed")


def _check_options(opt: BuildOptions) -> None:
    """Every option, checked before any file is written (a typo must not cost a 1-minute export first)."""
    from sedeploy import calibration, fp16, int8

    if opt.backend not in BUILD_CHOICES:
        raise SedeployError(f"Unknown backend '{opt.backend}'.", expected=f"one of {', '.join(BUILD_CHOICES)}",
                            fix="pass --backend ort (ONNX Runtime, runs everywhere), trt (NVIDIA GPU), openvino "
                                "(CPU) or none (portable artifacts only)")
    check_threads(opt.threads)
    _positive(opt.calib_batch, "--calib-batch", f"omit it (default {calibration.DEFAULT_BATCH_SIZE})")
    _positive(opt.calib_count, "--calib-count", f"omit it (default {calibration.DEFAULT_COUNT})")
    method = opt.calib_method or calibration.DEFAULT_METHOD
    if method not in calibration.METHODS:
        raise SedeployError(f"Unknown calibration method '{method}'.",
                            expected=f"one of {', '.join(calibration.METHODS)}",
                            fix=f"omit --calib-method (default {calibration.DEFAULT_METHOD})")
    if opt.se_int8 is not None and opt.se_int8 not in int8.SE_POLICIES:
        raise SedeployError(f"--se-int8 {opt.se_int8} is not valid.", expected=f"one of {', '.join(int8.SE_POLICIES)}")
    if opt.keep_fp32 is not None:
        fp16.parse_keep_fp32(opt.keep_fp32)
        if not (opt.fp16 or opt.int8):
            raise SedeployError(f"--keep-fp32 {opt.keep_fp32} chooses what stays FP32 in the FP16 artifact and the "
                                "TensorRT INT8 form; neither --fp16 nor --int8 was given.",
                                fix="add --fp16 (and/or --int8), or drop --keep-fp32")
    if opt.calib is not None:
        from sedeploy.preprocess import find_images

        found = find_images(opt.calib, what="calibration image folder (--calib)")
        need = calibration.MIN_IMAGES[method]
        usable = min(len(found.paths), opt.calib_count or calibration.DEFAULT_COUNT)
        if opt.int8 and usable < need:
            why = (f"--calib-count {opt.calib_count}" if opt.calib_count and opt.calib_count < len(found.paths)
                   else f"the calibration image folder (--calib) '{found.root}' holds {len(found.paths)}")
            raise SedeployError(f"Calibration method '{method}' needs at least {need} images; {why}.",
                                expected=f"{need} or more calibration images for {method}",
                                fix=f"add images to the folder, raise --calib-count to ≥ {need}, or use "
                                    "--calib-method minmax")
    elif opt.int8 and opt.calib_count is not None and opt.calib_count < calibration.MIN_IMAGES[method]:
        raise SedeployError(f"--calib-count {opt.calib_count} is below what calibration method '{method}' needs "
                            f"({calibration.MIN_IMAGES[method]} images).",
                            fix=f"raise --calib-count to ≥ {calibration.MIN_IMAGES[method]}, or use "
                                "--calib-method minmax")
    if opt.int8:
        _check_cache_location(opt.calib_cache)
    if not opt.workspace_gib > 0:
        raise SedeployError(f"--workspace {opt.workspace_gib} is not valid.", expected="a size in GiB > 0",
                            fix="omit --workspace (default 4)")
    if opt.backend != "none":
        from sedeploy.backends import require

        require(opt.backend, _backend_purpose(opt.backend))  # exit 4 with the install hint, before any work
    budget = opt.max_top1_drop is not None or opt.min_agreement is not None
    extras = (opt.max_fallback, opt.budget_confidence, opt.fallback_order)
    if (budget or opt.val is not None or opt.warn_agreement is not None
            or any(e is not None for e in extras)) and not opt.int8:
        raise SedeployError("--min-agreement / --max-top1-drop / --val / --warn-agreement / --max-fallback / "
                            "--budget-confidence / --fallback-order check or budget the INT8 artifacts, "
                            "but --int8 was not given.", fix="add --int8")
    if any(e is not None for e in extras) and not budget:
        raise SedeployError("--max-fallback / --budget-confidence / --fallback-order were given without a budget.",
                            fix="add --min-agreement PCT and/or --max-top1-drop PTS")
    from sedeploy.int8_check import check_warn_agreement

    check_warn_agreement(opt.warn_agreement)
    if opt.max_fallback is not None and opt.max_fallback < 0:
        raise SedeployError(f"--max-fallback {opt.max_fallback} is not valid.", expected="a whole number ≥ 0")
    if opt.label_offset < 0:
        raise SedeployError(f"--label-offset {opt.label_offset} is not valid.", expected="a whole number ≥ 0",
                            fix="pass 1 for 1001-class models with a background class at index 0")
    if budget:
        _budget(opt)  # validates before any work
    if opt.fallback_order is not None:
        from sedeploy.int8_budget import check_fallback_order

        check_fallback_order(opt.fallback_order)
    from sedeploy.backends.tensorrt import validate_profile

    validate_profile(opt.min_batch, opt.opt_batch, opt.max_batch)  # refused whatever the backend (used by trt)
    if opt.backend == "trt":
        from sedeploy.backends.tensorrt import require_trt

        if opt.timing_cache is not None:
            _check_file_target(opt.timing_cache, "TensorRT timing cache (--timing-cache)")
        require_trt(_backend_purpose("trt"))


def _check_file_target(path: str | Path, what: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise SedeployError(f"The {what} '{p}' is a folder.", expected="a file path (it is created if missing)",
                            fix=f"name a file inside it, e.g. {p / 'cache.json'}")
    ensure_writable_dir(p.parent if str(p.parent) else Path("."), f"folder of the {what}",
                        fix="pass a path in a folder you can write to")


def _check_cache_location(pinned: str | Path | None) -> None:
    """The calibration cache must be writable before calibrating (not after minutes of work)."""
    if pinned is not None:
        _check_file_target(pinned, "calibration cache file (--calib-cache)")
        return
    from sedeploy.calibration import default_cache_dir

    folder = default_cache_dir()
    ensure_writable_dir(folder, "calibration cache folder",
                        fix="set SEDEPLOY_CACHE to a writable folder, or pass --calib-cache FILE")
    clean_stale_partials(folder, older_than=time.time(), locked=False)


#: --resize may be at most this many times the crop (mmcls resizes 256 for a 224 crop; 100,000 px ran out of memory)
MAX_RESIZE_FACTOR = 8


def foreign_preprocess(model: str | Path, *, mean: tuple[float, float, float] | None = None,
                       std: tuple[float, float, float] | None = None, resize: int | None = None,
                       input_shape: tuple[int, int] | None = None, channel_order: str | None = None,
                       resize_mode: str | None = None) -> Preprocess:
    """The preprocessing of a foreign MODEL (``--mean/--std/--resize/--channel-order/--resize-mode``): what the
    model records (a sedeploy export), else the mmcls pipeline at the model's input size (``input_shape`` (H, W)
    where H/W are dynamic), with the given values in place. ``resize`` (the short side before the centre crop) from
    the crop's short side to :data:`MAX_RESIZE_FACTOR` × it. Mean/std on the 0–1 scale are refused with the
    values they stand for on 0–255 pixels."""
    from sedeploy.onnxcore import image_input, load_onnx
    from sedeploy.preprocess import check_normalisation

    proto = load_onnx(model, weights=False, check=False)
    h, w = model_image_size(image_input(proto, path=str(model), dynamic_hw=True), input_shape, path=str(model))
    check_normalisation(mean, std)
    short = min(h, w)
    if resize is not None and resize_mode == "pad":
        raise SedeployError(f"--resize {resize} sets the short side before a centre crop; --resize-mode pad "
                            f"resizes every image to the input height ({h} px) instead.",
                            fix="drop --resize, or use --resize-mode crop")
    if resize is not None and not short <= resize <= MAX_RESIZE_FACTOR * short:
        raise SedeployError(f"--resize {resize} is not valid for a {h}×{w} input.",
                            expected=f"a short-side size from the crop's short side ({short} px) to "
                                     f"{MAX_RESIZE_FACTOR * short} ({MAX_RESIZE_FACTOR}× it)",
                            fix=f"omit --resize (default {round(short * 256 / 224)}), or pass {short}–"
                                f"{MAX_RESIZE_FACTOR * short}")
    base = Preprocess.for_size(h, width=None if w == h else w)
    stored = get_metadata(proto).get(META.PREPROCESS)
    if isinstance(stored, dict):
        try:
            recorded = Preprocess.from_dict(stored)
        except (TypeError, SedeployError):
            recorded = None
        if recorded is not None and recorded.shape == (h, w):
            base = recorded
    return dataclasses.replace(base, resize_short=base.resize_short if resize is None else resize,
                               mean=mean or base.mean, std=std or base.std,
                               channel_order=channel_order or base.channel_order,
                               resize_mode=resize_mode or base.resize_mode)


def model_image_size(inp, input_shape: tuple[int, int] | None, *, path: str) -> tuple[int, int]:
    """(H, W) the build runs ``inp`` at: its own, or ``input_shape`` where H/W are dynamic (refused when missing,
    or when it contradicts a fixed size)."""
    if inp.dynamic_hw and input_shape is None:
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {inp.shape}: its height and width are dynamic.",
                            expected="an image size to build for (engines, calibration and benchmarks run one "
                                     "fixed H×W)",
                            fix="pin it with --input-shape HxW: the size the model is used at (its documentation or "
                                "exporter states it), e.g. --input-shape 224x224 or --input-shape 48x192")
    if input_shape is None:
        return inp.height, inp.width
    h, w = input_shape
    if (inp.height or h, inp.width or w) != (h, w):
        raise SedeployError(f"--input-shape {h}x{w} does not fit '{path}': its input '{inp.name}' is fixed at "
                            f"{inp.shape}.",
                            fix=f"drop --input-shape (it pins dynamic H/W only), or pass "
                                f"{inp.height or h}x{inp.width or w}")
    return h, w


def _preprocess_for(meta: dict[str, Any], hw: tuple[int, int], given: Preprocess | None,
                    res: BuildResult | None = None) -> Preprocess:
    stored = meta.get(META.PREPROCESS)
    recorded = None
    if isinstance(stored, dict):
        try:
            recorded = Preprocess.from_dict(stored)
        except (TypeError, SedeployError):
            log.warning("Ignoring unreadable preprocessing metadata %s; using the mmcls pipeline at %d×%d px.",
                        stored, *hw)
    if given is not None:
        if given.shape != tuple(hw):
            raise SedeployError(f"The preprocessing makes {given.shape[0]}×{given.shape[1]} images but the model's "
                                f"input is {hw[0]}×{hw[1]} px.",
                                fix="build it for the model's input size (Preprocess.for_size(H, width=W), or "
                                    "foreign_preprocess(MODEL, …))")
        if recorded is not None and recorded != given:  # --mean/--std/… on a sedeploy export: said, then used
            msg = (f"the preprocessing given ({given.describe()}) replaces the one the model records "
                   f"({recorded.describe()}); every artifact records the given one")
            log.warning("%s%s.", msg[0].upper(), msg[1:])
            if res is not None:
                res.notes.append(msg)
        return given
    if recorded is not None:
        return recorded
    return Preprocess.for_size(hw[0], width=None if hw[0] == hw[1] else hw[1])


def _prepare_input(proto, opt: BuildOptions, src: Path, res: BuildResult):
    """The FP32 model with the input every artifact takes: H/W pinned (``--input-shape``, onnx-ir + shape
    inference) and NCHW (an NHWC model's converter Transpose dropped, or one Transpose added), recorded in the
    metadata and the notes."""
    from sedeploy.onnxcore import check_input_memory, image_input, nchw_input, pin_image_size

    inp = image_input(proto, path=str(src), dynamic_hw=True)
    h, w = model_image_size(inp, opt.input_shape, path=str(src))
    changes: dict[str, Any] = {"source_shape": inp.shape, "source_layout": inp.layout}
    if inp.dynamic_hw:
        proto = pin_image_size(proto, h, w, path=str(src))
        changes["pinned"] = [h, w]
        res.notes.append(f"input H×W pinned to {h}×{w} (--input-shape): shapes inferred again from it")
    proto, how = nchw_input(proto, path=str(src))
    if how is not None:
        changes["to_nchw"] = how
        res.notes.append(f"NHWC input {'×'.join(map(str, inp.shape))}: {how}; every artifact and engine takes "
                         "N×3×H×W (as fast as the NHWC graph fed from sedeploy's N×3×H×W batches on ONNX Runtime and "
                         "OpenVINO: benchmarks/results/input_layout)")
    final = image_input(proto, path=str(src))
    check_input_memory(final, path=str(src), option=f"--input-shape {h}x{w}" if inp.dynamic_hw else None)
    set_metadata(proto, {META.INPUT_LAYOUT: final.layout, META.INPUT_CHANGES: changes})
    return proto, final, changes


def _check_images(pp: Preprocess, folder: Path | None, limit: int = 8) -> np.ndarray:
    from sedeploy.preprocess import load_folder, smooth_noise

    what = "calibration image folder (--calib)" if folder else "shipped calibration image folder"
    images, _ = load_folder(folder or default_calib_dir(), pp, limit=limit, what=what)
    return np.concatenate([images, smooth_noise(2, pp.shape, seed=1)]).astype(np.float32)


def _canonicalize(proto, src: Path, res: BuildResult):
    """The input graph in canonical form (sedeploy.passes.canonical), before any other pass; what changed is
    reported. Checked numerically with the fused graph in :func:`_fuse` (against the input model)."""
    from sedeploy.passes.canonical import canonicalize

    out, report = canonicalize(proto, label=res.source or str(src))
    res.canonical = report.as_dict()
    if report.changed:
        removed = ", ".join(f"{n} {op}" for op, n in report.removed().items())
        res.notes.append(f"canonicalised the input graph: nodes {report.nodes_before} → {report.nodes_after}"
                         + (f" (folded or fused away: {removed})" if removed else "")
                         + (f"; opset {report.opset_before} → {report.opset_after}"
                            if report.opset_before != report.opset_after else ""))
    return out


def _reference_outputs(proto, x: np.ndarray, label: str, static_batch: int | None) -> np.ndarray:
    """The input model's own outputs on the check images, or one clear error naming the model when it cannot
    be a classifier sedeploy can verify: it fails to run (at batch 1, or only at larger batches although its
    batch is dynamic), outputs no classes, or outputs NaN/inf itself."""
    from sedeploy.onnxcore.session import ort_errors, ort_module

    def attempt(batch):
        try:
            return run_model(proto, batch)
        except (SedeployError, *ort_errors(ort_module())) as err:
            return err

    out = attempt(x)
    if isinstance(out, Exception):
        first = (getattr(out, "what", None) or str(out)).strip()
        first = (first.splitlines() or [type(out).__name__])[0].replace("'<model bytes>'", "the model")[:300]
        single = attempt(x[:1]) if static_batch is None and len(x) > 1 else out
        if not isinstance(single, Exception):
            raise SedeployError(f"'{label}' declares a dynamic batch but fails on a batch of {len(x)} images "
                                f"(it runs at batch 1): {first}",
                                expected="a model that runs at every batch size its input declares (a Reshape "
                                         "with a literal batch of 1 breaks that)",
                                fix="re-export it with a batch-independent reshape (e.g. Flatten, or a target "
                                    "shape of [-1, C]) or with a fixed batch of 1") from out
        raise SedeployError(f"'{label}' fails to run on ONNX Runtime: {first}",
                            fix="check that the model runs on its own (onnxruntime.InferenceSession) and re-export "
                                "it") from out
    if out.ndim != 2 or out.shape[0] != len(x) or out.shape[1] < 2:
        raise SedeployError(f"'{label}' outputs shape {list(out.shape)} on {len(x)} images.",
                            expected=f"N×classes with at least 2 classes (here {len(x)}×classes)",
                            fix="pass an image classifier with one logits/probabilities output")
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise SedeployError(f"'{label}' itself outputs NaN/inf on {int(bad.sum())} of {len(x)} check images "
                            "(before any sedeploy pass): the model is broken, not its conversion.",
                            expected="finite outputs on real images",
                            fix="check the model's weights and its preprocessing (--mean/--std), and re-export it")
    return out


def _fuse(proto, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult, *, reference=None,
          label: str = "model") -> Path:
    from sedeploy.backends.ort import optimized_graph_histogram

    fp32_path = artifact_path(out, stem, "fp32")
    reference = proto if reference is None else reference
    x = _check_images(pp, Path(opt.calib) if opt.calib else None)
    before = _reference_outputs(reference, x, label, (res.shapes or {}).get("static_batch"))
    tol = max(FUSION_ATOL, FUSION_RTOL * float(np.abs(before).max()))
    if reference is not proto:  # the canonical graph must compute what the input model computes
        diff = float(np.abs(before - run_model(proto, x)).max())
        if res.canonical is not None:
            res.canonical.update(max_abs_diff_vs_input=diff, tolerance=tol)
        if not diff <= tol:
            raise VerificationError(f"The canonicalised graph of '{label}' differs from it by max |Δ| {diff:.3g} "
                                    f"> {tol:.3g}; nothing was written.",
                                    fix="report this as a sedeploy bug with the model")
    if not opt.fuse_se:
        res.notes.append("SE fusion skipped (--no-fuse-se): the FP32 artifact is the input graph")
        proto = _dynamic_batch(proto, opt, res)
        set_metadata(proto, {META.PRECISION: "fp32", META.SE_FUSED: 0, META.PREPROCESS: pp.as_dict()})
        return save_onnx(proto, fp32_path)
    from sedeploy.passes import fuse_se_blocks

    t0 = time.perf_counter()
    fused, report = fuse_se_blocks(proto)
    res.se_blocks_found, res.se_blocks_fused = report.found, report.fused
    diff = float(np.abs(before - run_model(fused, x)).max())
    if not diff <= tol:
        raise VerificationError(f"The SE-fused graph differs from the input graph by max |Δlogit| {diff:.3g} "
                                f"> {tol:.3g} (1e-5 × max |logit|); nothing was written.",
                                fix="report this as a bug with the model; --no-fuse-se builds without the pass")
    fused = _dynamic_batch(fused, opt, res)
    # the preprocessing travels with the artifacts (bench and serving read it; --mean/--std of a foreign model)
    set_metadata(fused, {META.PRECISION: "fp32", META.SE_FUSED: report.fused, META.SE_FORM: report.form,
                         META.PREPROCESS: pp.as_dict()})
    save_onnx(fused, fp32_path)
    res.timings["fuse_se_s"] = round(time.perf_counter() - t0, 2)
    res.fusion = {**report.as_dict(), "max_abs_diff_vs_unfused": diff, "tolerance": tol, "checked_on": len(x)}
    try:
        hist = optimized_graph_histogram(fp32_path, "all", threads=1)
        res.fusion["ort_optimized_histogram"] = hist
        res.fusion["ort_reorders"] = {k.split(":")[-1]: v for k, v in hist.items() if "Reorder" in k}
    except SedeployError as err:  # the histogram is a report, not a requirement
        res.notes.append(f"ORT optimized-graph histogram unavailable: {err.what}")
    return fp32_path


def _dynamic_batch(proto, opt: BuildOptions, res: BuildResult):
    """--dynamic-batch: the model with its fixed batch renamed to N, or a clear refusal (nothing is written)."""
    if not opt.dynamic_batch or not (res.shapes or {}).get("static_batch"):
        if opt.dynamic_batch:
            res.notes.append("--dynamic-batch: the batch is already dynamic")
        return proto
    from sedeploy.passes import make_batch_dynamic

    dyn, why = make_batch_dynamic(proto)
    if dyn is None:
        raise SedeployError(f"--dynamic-batch: the batch of '{res.source}' cannot be made dynamic safely: {why}.",
                            expected="a graph without batch-dependent constants (after SE fusion)",
                            fix="drop --dynamic-batch: the model then runs at its fixed batch (larger batches are "
                                "chunked), or re-export it with a dynamic batch")
    res.shapes = {**res.shapes, "input": ["N", *res.shapes["input"][1:]], "static_batch": None,
                  "batch_handling": f"fixed batch {res.shapes['static_batch']} → {why}"}
    return dyn


def _fp16(fp32_path: Path, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> None:
    from sedeploy import fp16

    t0 = time.perf_counter()
    keep = fp16.DEFAULT_KEEP_FP32 if opt.keep_fp32 is None else opt.keep_fp32
    path = artifact_path(out, stem, "fp16")
    report = fp16.convert_fp16(fp32_path, path, keep_fp32=keep,
                                    verify_inputs=_check_images(pp, Path(opt.calib) if opt.calib else None))
    res.timings["fp16_s"] = round(time.perf_counter() - t0, 2)
    res.artifacts.append(Artifact(path, "fp16", None, report.as_dict()))


def _budget(opt: BuildOptions):
    from sedeploy.int8_budget import Budget

    return Budget(max_top1_drop=opt.max_top1_drop, min_agreement=opt.min_agreement,
                  confidence=opt.budget_confidence)


def _heldout(opt: BuildOptions, folder: Path, pp: Preprocess, num_classes: int):
    """(images, labels or None, relative calibration paths to exclude, description) for the INT8 budget."""
    from sedeploy.labels import resolve_labels_offset
    from sedeploy.int8_budget import heldout_split
    from sedeploy.preprocess import find_images, load_batch

    if opt.val is not None:
        from sedeploy.int8_check import refuse_seen_val

        found = find_images(opt.val, what="held-out image folder (--val)")
        root, paths, exclude = found.root, found.paths, set()
        refuse_seen_val(paths, root, folder, count=opt.calib_count, seed=opt.calib_seed)
        what = f"{len(paths)} images of --val {root}"
    else:
        root, paths, exclude = heldout_split(folder, seed=opt.calib_seed)
        what = f"{len(paths)} images held out of --calib {root} (seeded split; not calibrated on)"
    images, loaded = load_batch(paths, pp, progress=opt.progress, what=f"held-out image folder '{root}'")
    labels = resolve_labels_offset(loaded, root, num_classes=num_classes, label_offset=opt.label_offset) \
        if any(len(p.relative_to(root).parts) > 1 for p in loaded) else None
    return images, None if labels is None else labels.indices, exclude, what


def _int8(fp32_path: Path, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> None:
    from sedeploy import calibration, int8
    from sedeploy.checks import check_trt_qdq, format_report

    if opt.calib is None:
        log.info("--int8 without --calib: calibrating on the %s images shipped in %s (pass --calib DIR with "
                 "images like the deployment data for better ranges)", "sample", default_calib_dir())
        res.notes.append(f"calibrated on the shipped sample images in {default_calib_dir()} (no --calib given)")
    folder = Path(opt.calib) if opt.calib else default_calib_dir()
    budget = None
    exclude: set[str] = set()
    if opt.max_top1_drop is not None or opt.min_agreement is not None:
        budget = _budget(opt)
        from sedeploy.preprocess import smooth_noise

        num_classes = int(run_model(fp32_path, smooth_noise(1, pp.shape, seed=1)).shape[1])
        held_x, held_y, exclude, held_what = _heldout(opt, folder, pp, num_classes)
        budget.check_images(len(held_x))  # too few images for --budget-confidence: refused before calibrating
        res.int8_budget = {"budget": {"max_top1_drop": opt.max_top1_drop, "min_agreement": opt.min_agreement,
                                      "confidence": opt.budget_confidence},
                           "heldout": held_what, "labelled": held_y is not None, "flavours": {}}
        res._int8_pending = {"images": held_x, "what": held_what, "pp": pp}
    else:
        from sedeploy import int8_check

        held = int8_check.plan(folder, val=opt.val, count=opt.calib_count, seed=opt.calib_seed,
                               method=opt.calib_method or calibration.DEFAULT_METHOD)
        res._int8_pending = {"held": held, "pp": pp}
        if isinstance(held, int8_check.HeldOut):
            exclude = held.exclude
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in {"method": opt.calib_method, "count": opt.calib_count,
                                "batch_size": opt.calib_batch}.items() if v is not None}
    calib = calibration.calibrate(fp32_path, folder, seed=opt.calib_seed, cache_path=opt.calib_cache,
                                  progress=opt.progress, preprocess=pp, exclude=exclude, **kwargs)
    res.timings["calibrate_s"] = round(time.perf_counter() - t0, 2)
    res.calibration = {"folder": str(folder), "images": len(calib.images), "skipped": list(calib.skipped),
                       "method": calib.method, "params": calib.params, "seed": opt.calib_seed,
                       "cache_hit": calib.cache_hit, "cache_path": calib.cache_path, "key": calib.key,
                       "seconds": res.timings["calibrate_s"], "held_out": len(exclude)}
    if calib.cache_hit:
        res.calibration["computed_seconds"] = calib.seconds  # what the cached run took
    if budget is None and not isinstance(res._int8_pending["held"], str):
        from sedeploy.int8_check import confirm_unseen

        confirm_unseen(res._int8_pending["held"], calib.images)
    se = int8.DEFAULT_SE_POLICY if opt.se_int8 is None else opt.se_int8
    # the OpenVINO form only when OpenVINO engines are built (ORT and TensorRT have their own forms)
    for flavour in ("trt", "cpu", *(("ov",) if opt.backend == "openvino" else ())):
        t0 = time.perf_counter()
        path = artifact_path(out, stem, f"int8-{flavour}")
        # the TensorRT flavour is the FP16 graph with Q/DQ: it takes the FP16 artifact's keep-FP32 policy
        keep = opt.keep_fp32 if flavour == "trt" else None
        if budget is not None:
            from sedeploy.int8_budget import DEFAULT_FALLBACK_ORDER, quantize_to_budget

            report, brep = quantize_to_budget(fp32_path, calib, path, flavour=flavour, images=held_x, labels=held_y,
                                              budget=budget, se=se, max_fallback=opt.max_fallback,
                                              threads=opt.threads, keep_fp32=keep,
                                              order=opt.fallback_order or DEFAULT_FALLBACK_ORDER)
            res.int8_budget["flavours"][flavour] = brep.as_dict()
        else:
            report = int8.quantize_model(fp32_path, calib, path, flavour=flavour, se=se, keep_fp32=keep)
        entry = Artifact(path, "int8", flavour, report.as_dict())
        if flavour == "trt":
            check = check_trt_qdq(str(path))
            res.validation = check.as_dict()
            if not check.ok:
                path.unlink(missing_ok=True)
                raise VerificationError(f"The TensorRT INT8 artifact breaks TensorRT's Q/DQ rules; it was not "
                                        f"kept.\n{format_report(check)}",
                                        fix="report this as a bug; the CPU flavour and FP16 are unaffected")
        res.timings[f"int8_{flavour}_s"] = round(time.perf_counter() - t0, 2)
        res.artifacts.append(entry)


def _engine_options(opt: BuildOptions) -> EngineOptions:
    return EngineOptions(threads=opt.threads, min_batch=opt.min_batch, opt_batch=opt.opt_batch,
                         max_batch=opt.max_batch, workspace_gib=opt.workspace_gib, timing_cache=opt.timing_cache)


def _build_engines(res: BuildResult, out: Path, opt: BuildOptions, *, given: bool = False) -> None:
    """Engines of the chosen backend. In a full build the INT8 form meant for another backend is only written;
    an artifact the user gave as MODEL is built as asked (``given``), with a note when its form is not the one
    this backend runs best (``_check_artifact_for_backend`` has refused the forms a backend cannot read)."""
    from sedeploy.backends import BackendCompileError, build_engine, unsupported_here

    if opt.backend == "none":
        _check_int8(res, opt)
        return
    table = BACKENDS[opt.backend]
    for art in res.artifacts:
        if art.kind not in table.kinds and art.kind != "int8":  # "int8": unknown flavour, built as given
            if not given:
                res.notes.append(f"{art.path.name}: written as a portable artifact; no {table.label} engine is "
                                 f"built from it (the {art.kind} form is meant for another backend)")
                continue
            fp16_parts = False
            if art.kind == "int8-trt":
                from sedeploy.onnxcore import holds_fp16_tensors

                fp16_parts = unsupported_here(opt.backend, "fp16") is not None and holds_fp16_tensors(art.path)
            res.notes.append(f"{art.path.name}: the {art.kind} form is meant for another backend; built for "
                             f"{table.label} as asked (it runs, but not in the form {table.label} runs fastest"
                             + (f"; its FP16 parts compute in FP32 here: {table.label} has no FP16 kernels on this "
                                "CPU" if fp16_parts else "") + ")")
        why = unsupported_here(opt.backend, art.precision)
        if why is not None and not given:  # an artifact given as MODEL is refused by the builder, with the reason
            res.notes.append(f"{art.path.name}: written as a portable artifact; no {table.label} engine is built "
                             f"from it: {why}")
            continue
        t0 = time.perf_counter()
        fallback = None
        try:
            eng = build_engine(opt.backend, art.path, out, _engine_options(opt))
        except BackendCompileError as err:
            eng, art, fallback = _engine_fallback(err, art, res, out, opt)
        res.timings[f"engine_{art.kind}_s"] = round(time.perf_counter() - t0, 2)
        res.engines.append({**eng.as_dict(), "from": str(art.path), "kind": art.kind, "flavour": art.flavour,
                            "graph_rewrites": dict((eng.metadata or {}).get("graph_rewrites") or {}),
                            **({"fallback": fallback} if fallback else {})})
    _check_int8(res, opt)


def _engine_fallback(err, art: Artifact, res: BuildResult, out: Path, opt: BuildOptions):
    """The backend's library refused to compile ``art``. Under ``--backend auto``: that precision's engine on the
    backend table's fallback (ONNX Runtime), from the artifact of the same precision in its form, said in a
    warning and the result; returns (engine, the artifact it was built from, what happened). With an explicit
    ``--backend``: one error whose fix is another backend (nothing is published)."""
    from sedeploy.backends import build_engine, fallback_backend, unsupported_here

    row = BACKENDS[opt.backend]
    other = fallback_backend(opt.backend)
    name = Path(art.path).name
    if other is None:  # no backend to fall back on: the library's own error, as it is
        raise err
    if not opt.auto_backend:
        raise SedeployError(
            f"{row.label} cannot compile the {art.kind} artifact {name} ({err.reason}), so no {row.label} engine of "
            f"it can be built (--backend {opt.backend}). Nothing was written.",
            fix=f"build that precision on {BACKENDS[other].label}: rerun with --backend auto (every other engine on "
                f"{row.label}, this one on {BACKENDS[other].label}) or --backend {other} (every engine on "
                f"{BACKENDS[other].label}); report the {row.label} failure at {row.issues}") from err
    target = BACKENDS[other]
    src = art if art.kind in target.kinds else next(
        (a for a in res.artifacts if a.precision == art.precision and a.kind in target.kinds), art)
    why = unsupported_here(other, src.precision)
    if why is not None:
        raise SedeployError(f"{row.label} cannot compile the {art.kind} artifact {name} ({err.reason}), and "
                            f"{target.label} cannot run {src.precision.upper()} here either: {why}.",
                            fix=f"rerun without --{src.precision}, or build on another machine; report the "
                                f"{row.label} failure at {row.issues}") from err
    eng = build_engine(other, src.path, out, _engine_options(opt))
    said = (f"{name}: {row.label} cannot compile it ({err.reason}); --backend auto built its {src.precision.upper()} "
            f"engine on {target.label} from {Path(src.path).name} instead (the artifact is kept; every other engine "
            f"is {row.label}'s). Please report the {row.label} failure at {row.issues} with that file")
    log.warning(said)
    res.notes.append(said)
    return eng, src, {"backend": opt.backend, "artifact": name, "reason": err.reason, "report": row.issues,
                      "built_on": other}


def _check_int8(res: BuildResult, opt: BuildOptions) -> None:
    """INT8 agreement with FP32 on held-out images (sedeploy.int8_check), on the runtime each artifact runs on;
    warns below ``opt.warn_agreement``. The budget's own figures are reused where it measured on that runtime."""
    from sedeploy import int8_check

    pending, res._int8_pending = res._int8_pending, None
    ints = [a for a in res.artifacts if a.precision == "int8" and a.flavour]
    if pending is None or not ints:
        return
    t0 = time.perf_counter()
    floor = int8_check.DEFAULT_WARN_AGREEMENT if opt.warn_agreement is None else opt.warn_agreement
    held = pending.get("held")
    if isinstance(held, str):
        said = (f"WARNING: INT8 agreement with FP32 not measured: {held}. Pass --val DIR (held-out images like "
                "the deployment data) to check it")
        log.warning(said.removeprefix("WARNING: "))
        res.notes.append(said)
        res.int8_check = {"measured": False, "reason": held, "warn_below_pct": floor}
        return
    ov_built = {e["kind"] for e in res.engines if e["backend"] == "openvino"}
    fp32 = next(a.path for a in res.artifacts if a.precision == "fp32")
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
            entries.append((a.kind, Path(a.path), runtime))
    if held is not None:
        from sedeploy.preprocess import load_batch

        images, _ = load_batch(held.paths, pending["pp"], progress=opt.progress,
                               what=f"held-out image folder '{held.root}'")
        heldout = {**held.as_dict(), "images": len(images)}
    else:  # the budget's held-out images
        images = pending["images"]
        heldout = {"source": "budget", "what": pending["what"], "images": len(images)}
    if entries:
        for kind, m in int8_check.measure(fp32, entries, images, threads=opt.threads).items():
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


def _check_artifact_for_backend(art: Artifact, backend: str) -> None:
    """An artifact given as MODEL must be one its backend reads, checked before any build (for TensorRT by the
    backend's own :func:`~sedeploy.backends.tensorrt.validate_trt_input`: QOperator CPU form refused, Q/DQ rules,
    strong typing)."""
    if backend != "trt":
        return
    from sedeploy.backends.tensorrt import validate_trt_input

    validate_trt_input(art.path)


def build_engines(model: str | Path | None, out_dir: str | Path, options: BuildOptions | None = None, *,
                  depth: int | None = None, checkpoint: str | None = None) -> BuildResult:
    """Run the whole `build-engine` job; see the module docstring. ``model=None`` uses a matching export of the
    SE-ResNet of ``depth`` (default 50, or the checkpoint's depth) when one is there, else exports it first.

    Every option is validated first; then, under an exclusive lock on ``out_dir``, everything is written into a
    staging folder inside it and published as one set with its manifest. On any failure or interruption the
    staging folder is removed and the folder keeps its previous set."""
    opt = options or BuildOptions()
    t_all = time.perf_counter()
    started = time.time()
    if model is not None:
        _check_model_file(model, opt.input_shape)
    elif opt.input_shape is not None:
        raise SedeployError("--input-shape pins the dynamic height and width of a MODEL; none was given.",
                            fix="pass the ONNX file, or drop --input-shape (the SE-ResNet export has a fixed size)")
    if opt.backend == "auto":
        from sedeploy.backends import resolve_backend

        chosen = resolve_backend(opt.backend)
        kind = Artifact.from_file(model).kind if model is not None else "fp32"
        if kind not in BACKENDS[chosen].kinds:  # an artifact made for another CPU backend (int8-cpu: ORT's form)
            chosen = next((n for n, b in BACKENDS.items() if kind in b.kinds and b.device != "gpu"), chosen)
        opt = dataclasses.replace(opt, backend=chosen, auto_backend=True)
        log.info("--backend auto: building %s engines (OpenVINO when it imports on x86-64, else ONNX Runtime; the "
                 "CPU backend an INT8 artifact given as MODEL was made for)", BACKENDS[opt.backend].label)
    _check_options(opt)
    made = missing_dirs(out_dir)  # -o and any parents this run creates: removed again if it fails
    try:
        out = ensure_writable_dir(out_dir, "output folder", fix="choose another output folder (-o DIR) or fix its "
                                                                "permissions")
        return _locked_build(model, out, opt, started, t_all, depth=depth, checkpoint=checkpoint,
                             created=bool(made))
    except BaseException:
        remove_empty_dirs(made)
        raise


def _locked_build(model, out: Path, opt: BuildOptions, started: float, t_all: float, *, depth, checkpoint,
                  created: bool = False) -> BuildResult:
    with folder_lock(out, what="output folder", command="build-engine"):
        try:
            clean_stale_partials(out, older_than=started)
            with staging_folder(out) as stage:  # (staging folders of killed runs go first: we hold the lock)
                try:
                    res = _build_staged(model, out, stage, opt, depth=depth, checkpoint=checkpoint)
                except SedeployError as err:
                    _name_intermediates(err, stage, model)
                    raise
                res.timings["total_s"] = round(time.perf_counter() - t_all, 2)
                _publish(stage, out, res)
        except BaseException:
            if created:  # a folder this run made (and holds the lock on) and left empty is not left behind
                with contextlib.suppress(OSError):
                    out.rmdir()  # (only when empty)
            raise
    return res


def _name_intermediates(err: SedeployError, stage: Path, model) -> None:
    """An error about a file in the staging folder (which is removed when the build fails) names it as what it
    is: sedeploy's intermediate made from the user's MODEL, not a file the user gave."""
    import re

    source = f" from '{model}'" if model is not None else ""
    for root in {str(stage.resolve()), str(stage)}:
        pattern = re.compile(re.escape(root) + r"/([^'\s]+)")
        err.what = pattern.sub(lambda m: f"{m.group(1)} (sedeploy's intermediate{source})", err.what)
        err.args = tuple(pattern.sub(lambda m: f"{m.group(1)} (sedeploy's intermediate{source})", a)
                         if isinstance(a, str) else a for a in err.args)


def _check_model_file(model: str | Path, input_shape: tuple[int, int] | None = None) -> None:
    """MODEL is an image classifier sedeploy can work on (read without its weights), at a size that fits in memory,
    checked before any work."""
    from sedeploy.onnxcore import check_input_memory, classifier_output, image_input, load_onnx

    p = Path(model)
    if p.is_dir():
        raise SedeployError(f"MODEL '{p}' is a folder.", expected="an ONNX file (.onnx)",
                            fix="pass the .onnx file, or omit MODEL to export the SE-ResNet of --depth")
    if not p.is_file():
        raise SedeployError(f"MODEL '{p}' does not exist.", expected="an ONNX file (.onnx)",
                            fix="check the path, or omit MODEL to export the SE-ResNet of --depth")
    proto = load_onnx(p, weights=False, check=False)
    inp = image_input(proto, path=str(p), dynamic_hw=True)
    h, w = model_image_size(inp, input_shape, path=str(p))
    check_input_memory(dataclasses.replace(inp, height=h, width=w), path=str(p),
                       option=f"--input-shape {h}x{w}" if inp.dynamic_hw else None)
    classifier_output(proto, path=str(p))


def _export_matches(path: Path, name: str, weights: str) -> bool:
    """Is ``path`` an export of the same network with the same weights by this sedeploy version?"""
    from sedeploy import __version__
    from sedeploy.onnxcore import image_input, load_onnx

    if not path.is_file():
        return False
    try:
        proto = load_onnx(path, weights=False, check=False)
        dynamic = image_input(proto, path=str(path)).dynamic_batch
    except SedeployError:
        return False
    meta = get_metadata(proto)
    want = {META.MODEL: name, META.WEIGHTS: weights, META.NUM_CLASSES: 1000,
            META.INPUT_SIZE: 224, META.PRECISION: "fp32", META.VERSION: __version__}
    return dynamic and all(str(meta.get(k)) == str(v) for k, v in want.items())


def _source_model(out: Path, stage: Path, opt: BuildOptions, res: BuildResult, depth: int | None,
                  checkpoint: str | None) -> Path:
    """No MODEL given: reuse the matching export (./<name>.onnx from `sedeploy export`, or <out>/<name>.onnx), or
    export into the staging folder; either way say which."""
    from sedeploy.export import export_model
    from sedeploy.model import build_model

    if checkpoint is None:
        name = build_model(depth or 50, seed=None).spec.name
        for candidate in (Path(f"{name}.onnx"), out / f"{name}.onnx"):
            if _export_matches(candidate, name, "random (seed 0)"):
                log.info("No MODEL given: using the existing export %s (%s, random weights, seed 0); pass MODEL to "
                         "choose another file.", candidate, name)
                res.notes.append(f"no MODEL given: reused the matching export {candidate} (same network, random "
                                 "weights seed 0, same sedeploy version)")
                return candidate
        what = f"{name} with random weights (seed 0)"
    else:
        name, what = None, f"the network of --checkpoint {checkpoint}"
    log.info("No MODEL given and no matching export found: exporting %s first (about a minute for "
             "SE-ResNet-50); pass MODEL to use an existing .onnx.", what)
    t0 = time.perf_counter()
    exp = export_model(depth=depth, checkpoint=checkpoint, output=stage / f"{name or 'model'}.onnx",
                       progress=opt.progress)
    final = stage / f"{exp.model}.onnx"
    if Path(exp.path) != final:
        os.replace(exp.path, final)
    res.export = {**exp.as_dict(), "path": str(out / final.name)}
    res.timings["export_s"] = round(time.perf_counter() - t0, 2)
    res.notes.append(f"no MODEL given: exported {exp.model} ({exp.weights}) → {out / final.name}")
    return final


def _build_staged(model, out: Path, stage: Path, opt: BuildOptions, *, depth, checkpoint) -> BuildResult:
    from sedeploy.onnxcore import classifier_output, image_input, load_onnx

    res = BuildResult(source="", out_dir=str(out))
    src = Path(model) if model is not None else _source_model(out, stage, opt, res, depth, checkpoint)
    res.source = str(out / src.name) if src.parent == stage else str(src)
    proto = load_onnx(src)
    classifier_output(proto, path=str(src))
    given = Artifact.from_file(src, proto)
    if given.precision == "fp32":
        proto, inp, changes = _prepare_input(proto, opt, src, res)
    else:  # an artifact used as is: its engine and every consumer take the layout it has
        inp, changes = image_input(proto, path=str(src)), None
    meta = get_metadata(proto)
    res.weights = str(meta.get(META.WEIGHTS) or "unknown (not a sedeploy export)")
    pp = _preprocess_for(meta, (inp.height, inp.width), opt.preprocess, res)
    res.shapes = _shape_report(proto, inp, changes, pp)
    stem = artifact_stem(src)

    if given.precision != "fp32":  # an artifact made elsewhere: build its engine only
        if opt.fp16 or opt.int8:
            raise SedeployError(f"'{src}' is already an {given.precision.upper()} artifact; --fp16/--int8 convert "
                                "an FP32 model.", fix=f"pass the FP32 model, or drop --fp16/--int8 to build a "
                                                      f"{opt.backend} engine from this artifact as it is")
        _check_artifact_for_backend(given, opt.backend)
        res.artifacts.append(given)
        res.notes.append(f"input is a {given.kind} artifact: used as is (no SE fusion, no conversion)")
    else:
        canonical = _canonicalize(proto, src, res)
        fp32_path = _fuse(canonical, stage, stem, opt, pp, res, reference=proto if res.canonical["changed"] else None,
                          label=res.source)
        res.artifacts.append(Artifact(fp32_path, "fp32"))
        if opt.fp16:
            _fp16(fp32_path, stage, stem, opt, pp, res)
        if opt.int8:
            _int8(fp32_path, stage, stem, opt, pp, res)
    _build_engines(res, stage, opt, given=given.precision != "fp32")
    return res


def _relocate(obj, stage: str, out: str):
    """``obj`` with every string that starts with the staging folder's path pointing into the output folder."""
    if isinstance(obj, str):
        return out + obj[len(stage):] if obj.startswith(stage) else obj
    if isinstance(obj, Path):
        return Path(_relocate(str(obj), stage, out))
    if isinstance(obj, dict):
        return {k: _relocate(v, stage, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_relocate(v, stage, out) for v in obj)
    return obj


def _listed_files(out: Path) -> set[str]:
    """The file names (in the output folder) the previous build's manifest lists; none when there is no readable
    one (then nothing is removed)."""
    try:
        return Manifest.read(out).listed_files()
    except SedeployError:
        return set()


def _publish(stage: Path, out: Path, res: BuildResult) -> None:
    """Move the finished set from ``stage`` into ``out`` (manifest last) and remove what the previous manifest
    listed that this build did not write. Runs with SIGINT/SIGTERM/SIGHUP held back."""
    pairs = [(str(stage.resolve()), str(out.resolve())), (str(stage), str(out))]  # absolute paths first

    def relocate(obj):
        for s, o in pairs:
            obj = _relocate(obj, s, o)
        return obj

    for sidecar in stage.glob("*.json"):  # sidecars record their source model's path
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        atomic_write_text(sidecar, json.dumps(relocate(data), indent=2, sort_keys=True) + "\n")
    res.artifacts = [Artifact(relocate(a.path), a.precision, a.flavour, relocate(a.report)) for a in res.artifacts]
    for name in ("engines", "notes", "fusion", "calibration", "validation", "int8_budget"):
        if hasattr(res, name):
            setattr(res, name, relocate(getattr(res, name)))
    new = sorted(p.name for p in stage.iterdir() if not p.name.startswith("."))
    keep = set(new) | {MANIFEST}
    source = Path(res.source)
    for p in (source.absolute(), source.resolve()):  # a MODEL inside the output folder is never removed, nor the
        if p.parent.resolve() == out.resolve():     # file a MODEL symlink points to there
            keep.add(p.name)
    stale = sorted(_listed_files(out) - keep)
    if stale:
        res.notes.append(f"removed what the previous build wrote and this one did not: {', '.join(stale)}")
    Manifest.write(stage, res.as_dict())
    publish_staged(stage, out, new, last=MANIFEST, stale=stale)  # the old manifest goes first, the new one last
    if stale:
        log.info("Removed %d file(s) of the previous build that this build did not write: %s", len(stale),
                 ", ".join(stale))


def _shape_report(proto, inp, changes: dict[str, Any] | None = None, pp: Preprocess | None = None) -> dict[str, Any]:
    """How the input's batch and layout are handled and what the output holds (said in the summary and the
    manifest)."""
    from sedeploy.onnxcore import output_kind

    batch = inp.static_batch
    report = {"input": [batch or "N", *inp.shape[1:]], "layout": inp.layout, "static_batch": batch,
              "batch_handling": (f"fixed batch {batch}: kept as exported; verification, calibration and the INT8 "
                                 f"checks run it {batch} image(s) at a time (larger batches are chunked and padded)"
                                 if batch else "dynamic batch"),
              "output": output_kind(proto)}
    if changes and (changes.get("pinned") or changes.get("to_nchw")):
        report["source_input"] = changes["source_shape"]
        report["input_changes"] = {k: v for k, v in changes.items() if k in ("pinned", "to_nchw")}
    if pp is not None:
        report["preprocess"] = pp.describe()
    return report


def _format_int8_check(check: dict[str, Any] | None) -> list[str]:
    """The summary lines of the INT8 agreement check."""
    from sedeploy.metrics import REPORT_CONFIDENCE
    from sedeploy.int8_check import RUNTIMES

    if not check:
        return []
    if not check.get("measured"):
        return [f"INT8 check  not measured: {check['reason']} (pass --val DIR)"]
    lines = [f"INT8 check  top-1 agreement with FP32 on {check['heldout']['what']}; warns below "
             f"{check['warn_below_pct']:g} %:"]
    for kind, m in check["artifacts"].items():
        lines.append(f"  {kind:<9} {m['agreement_pct']:6.2f} % ({REPORT_CONFIDENCE:.0%} lower bound "
                     f"{m['agreement_lcb_pct']:.2f} %, n = {m['n']}) on {RUNTIMES[m['runtime']]}"
                     + (f"  BELOW {check['warn_below_pct']:g} %" if m["below_warn"] else "")
                     + (f"  ({m['note']})" if m.get("note") else "")
                     + (f"  ({m['from']})" if m.get("from") else ""))
    return lines


def format_result(res: BuildResult) -> str:
    """The human-readable summary `build-engine` prints."""
    lines = [f"source      {res.source}"]
    if res.weights:
        lines.append(f"weights     {res.weights}" + ("  (timing is meaningful, accuracy is not)"
                                                     if res.weights.startswith("random") else ""))
    if res.shapes:
        sh = res.shapes
        lines.append(f"input       {'×'.join(map(str, sh['input']))} {sh.get('layout', 'NCHW')} "
                     + (f"(model: {'×'.join(map(str, sh['source_input']))}) " if sh.get("source_input") else "")
                     + f"({sh['batch_handling']}); output: {sh['output']}")
        if sh.get("preprocess"):
            lines.append(f"preprocess  {sh['preprocess']}")
    if res.se_blocks_found is not None:
        f = res.fusion or {}
        reorders = f.get("ort_reorders")
        lines.append(f"SE fusion   {res.se_blocks_fused}/{res.se_blocks_found} blocks fused, nodes "
                     f"{f.get('nodes_before')} → {f.get('nodes_after')}, max "
                     f"|Δ{'prob' if (res.shapes or {}).get('output') == 'probabilities' else 'logit'}| vs unfused "
                     f"{f.get('max_abs_diff_vs_unfused', float('nan')):.1e}"
                     + (f"; ORT layout reorders {reorders}" if reorders is not None else ""))
    if res.calibration:
        c = res.calibration
        lines.append(f"calibration {c['method']} on {c['images']} images from {c['folder']}"
                     + (f" (cache hit, {c['seconds']:.1f} s; computed in {c['computed_seconds']:.1f} s earlier)"
                        if c['cache_hit'] and c.get('computed_seconds') is not None
                        else f" ({'cache hit' if c['cache_hit'] else 'computed'}, {c['seconds']:.1f} s)"))
    if res.validation is not None:
        lines.append(f"TensorRT Q/DQ rules: {'pass' if res.validation.get('ok') else 'FAIL'}")
    if res.int8_budget:
        from sedeploy.metrics import REPORT_CONFIDENCE

        b = res.int8_budget
        lines.append(f"INT8 budget {', '.join(f'{k} {v}' for k, v in b['budget'].items() if v is not None)} on "
                     f"{b['heldout']}")
        for flavour, r in b["flavours"].items():
            a, f = r["all_int8"], r["result"]
            fell = r["fell_back"]
            speed = r.get("speed") or {}
            cost = ""
            if speed:
                cost = (f"; speed vs FP32 {speed['speedup_vs_fp32']['int8_budget']:.2f}× (all-INT8 "
                        f"{speed['speedup_vs_fp32']['int8_all']:.2f}×) at batch {speed['batch']} on "
                        f"{speed['backend']}")
            lines.append(f"  int8-{flavour}: agreement {a['agreement_pct']:.2f} % with every layer quantized → "
                         f"{f['agreement_pct']:.2f} % ({REPORT_CONFIDENCE:.0%} lower bound "
                         f"{f['agreement_lcb_pct']:.2f} %) with "
                         f"{len(fell)}/{r['layers']} layer(s) in float"
                         + (f" ({', '.join(fell[:6])}{' …' if len(fell) > 6 else ''})" if fell else "")
                         + (f"; top-1 drop {f['top1_drop_pts']:.2f} pt (upper bound {f['top1_drop_ucb_pts']:.2f})"
                            if r["labelled"] else "") + cost)
    lines.extend(_format_int8_check(res.int8_check))
    lines.append("artifacts (portable ONNX):")
    for a in res.artifacts:
        lines.append(f"  {a.kind:<22} {a.path}")
    if res.engines:
        lines.append("engines:")
        for e in res.engines:
            moved = (e.get("graph_rewrites") or {}).get("squeeze_first")
            fb = e.get("fallback")
            lines.append(f"  {e['backend']:<11} {e['precision']:<10} {e['path']}"
                         + (f"  (squeeze-first: {moved} SE squeezes pool before the expanding conv)" if moved else "")
                         + (f"  (fallback: {BACKENDS[fb['backend']].label} cannot compile {fb['artifact']}: "
                            f"{fb['reason']}; report it at {fb['report']})" if fb else ""))
    for n in res.notes:
        lines.append(f"note: {n}")
    lines.append(f"time        {res.timings.get('total_s', 0):.1f} s "
                 + " ".join(f"{k[:-2]}={v:.1f}s" for k, v in res.timings.items() if k != "total_s"))
    return "\n".join(lines)
