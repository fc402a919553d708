"""`build-engine`'s options: one record, every field checked before any work (a typo must not cost a 1-minute
export first).

The engine fields (threads, the TensorRT profile, workspace and timing cache) are one
:class:`~sedeploy.backends.EngineOptions`, passed to the backends as it is; :meth:`BuildOptions.from_flat` takes
them as flat keywords beside the build's own.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from sedeploy import fp16, quantize
from sedeploy.backends import BACKENDS, BUILD_CHOICES, EngineOptions, require
from sedeploy.backends.tensorrt import require_trt, validate_profile
from sedeploy.errors import SedeployError
from sedeploy.fsutil import clean_stale_partials, ensure_writable_dir
from sedeploy.int8_budget import Budget, check_fallback_order
from sedeploy.int8_check import check_warn_agreement
from sedeploy.onnxcore import check_threads
from sedeploy.preprocess import Preprocess, find_images

#: the fields of :class:`~sedeploy.backends.EngineOptions`, accepted flat by :meth:`BuildOptions.from_flat`
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineOptions))


@dataclass
class BuildOptions:
    """Everything `build-engine` can be asked; the defaults are the measured recommendations."""

    fp16: bool = False
    int8: bool = False
    fuse_se: bool = True
    backend: str = "auto"  # "auto": sedeploy.backends.default_cpu_backend() (OpenVINO when it imports, else ORT)
    calib: str | Path | None = None  # None: the shipped calib/ folder (said in the log)
    calib_method: str | None = None  # None: quantize.DEFAULT_METHOD
    calib_count: int | None = None  # None: quantize.DEFAULT_COUNT
    calib_seed: int = 0
    calib_batch: int | None = None
    calib_cache: str | Path | None = None
    se_int8: str | None = None  # None: quantize.DEFAULT_SE_POLICY
    keep_fp32: str | None = None  # None: fp16.DEFAULT_KEEP_FP32
    preprocess: Preprocess | None = None  # None: from the model's metadata, else mmcls defaults at its input size
    progress: bool = True
    # accuracy-budgeted INT8 (sedeploy.int8_budget): either bound turns the budget on
    max_top1_drop: float | None = None  # top-1 points vs FP32 on held-out images (needs labels)
    min_agreement: float | None = None  # top-1 agreement with FP32, percent
    budget_confidence: float | None = None  # meet the budget with one-sided bounds at this confidence
    fallback_order: str | None = None  # sedeploy.int8_budget.FALLBACK_ORDERS; None: its default
    val: str | Path | None = None  # held-out images; None: a seeded split of the calibration folder
    label_offset: int | None = None  # model output k + offset is dataset class k (1001-class models: 1); recorded
    max_fallback: int | None = None  # most layers allowed back in float
    dynamic_batch: bool = False  # a fixed-batch model: make the batch dynamic (refused with the reason if unsafe)
    input_shape: tuple[int, int] | None = None  # (H, W) pinning a model's dynamic height and width
    warn_agreement: float | None = None  # INT8 check: warn below this top-1 agreement, %; None: int8_check default
    auto_backend: bool = False  # set by build_engines when --backend auto chose the backend (fallback allowed)
    engine: EngineOptions = field(default_factory=EngineOptions)  # threads, TensorRT profile, workspace, timing cache

    @classmethod
    def from_flat(cls, **kwargs) -> BuildOptions:
        """The options from flat keywords: the build's own fields and :data:`ENGINE_FIELDS` (``threads=``,
        ``max_batch=``, …) side by side, as the command line has them."""
        engine = EngineOptions(**{k: kwargs.pop(k) for k in ENGINE_FIELDS if k in kwargs})
        return cls(**kwargs, engine=engine)


def check_positive(value, option: str, fix: str) -> None:
    """``value`` is None or a positive integer (``option`` and ``fix`` name it in the error)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SedeployError(f"{option} {value} is not valid.", expected="a positive integer", fix=fix)


def backend_purpose(backend: str) -> str:
    """What the backend's library is needed for (said when it is missing)."""
    return (f"Building {BACKENDS[backend].label} engines (--backend {backend}); the portable ONNX artifacts can be "
            "written anywhere with --backend none and built where the backend is installed")


def check_options(opt: BuildOptions) -> None:
    """Every option, checked before any file is written (a typo must not cost a 1-minute export first); the parts
    in this order, so that of two mistakes the same one is reported first."""
    method = check_choices(opt)
    check_calibration(opt, method)
    check_backend(opt)
    check_int8_checks(opt)
    check_engine(opt.engine, opt.backend)


def check_choices(opt: BuildOptions) -> str:
    """The backend, threads, calibration numbers and method, SE policy and keep-FP32 policy; returns the
    calibration method."""
    if opt.backend not in BUILD_CHOICES:
        raise SedeployError(f"Unknown backend '{opt.backend}'.", expected=f"one of {', '.join(BUILD_CHOICES)}",
                            fix="pass --backend ort (ONNX Runtime, runs everywhere), trt (NVIDIA GPU), openvino "
                                "(CPU) or none (portable artifacts only)")
    check_threads(opt.engine.threads)
    check_positive(opt.calib_batch, "--calib-batch", f"omit it (default {quantize.DEFAULT_BATCH_SIZE})")
    check_positive(opt.calib_count, "--calib-count", f"omit it (default {quantize.DEFAULT_COUNT})")
    method = opt.calib_method or quantize.DEFAULT_METHOD
    if method not in quantize.METHODS:
        raise SedeployError(f"Unknown calibration method '{method}'.",
                            expected=f"one of {', '.join(quantize.METHODS)}",
                            fix=f"omit --calib-method (default {quantize.DEFAULT_METHOD})")
    if opt.se_int8 is not None and opt.se_int8 not in quantize.SE_POLICIES:
        raise SedeployError(f"--se-int8 {opt.se_int8} is not valid.",
                            expected=f"one of {', '.join(quantize.SE_POLICIES)}")
    if opt.keep_fp32 is not None:
        fp16.parse_keep_fp32(opt.keep_fp32)
        if not (opt.fp16 or opt.int8):
            raise SedeployError(f"--keep-fp32 {opt.keep_fp32} chooses what stays FP32 in the FP16 artifact and the "
                                "TensorRT INT8 form; neither --fp16 nor --int8 was given.",
                                fix="add --fp16 (and/or --int8), or drop --keep-fp32")
    return method


def check_calibration(opt: BuildOptions, method: str) -> None:
    """Enough calibration images for ``method`` (--calib, --calib-count) and a writable calibration cache."""
    if opt.calib is not None:
        found = find_images(opt.calib, what="calibration image folder (--calib)")
        need = quantize.MIN_IMAGES[method]
        usable = min(len(found.paths), opt.calib_count or quantize.DEFAULT_COUNT)
        if opt.int8 and usable < need:
            why = (f"--calib-count {opt.calib_count}" if opt.calib_count and opt.calib_count < len(found.paths)
                   else f"the calibration image folder (--calib) '{found.root}' holds {len(found.paths)}")
            raise SedeployError(f"Calibration method '{method}' needs at least {need} images; {why}.",
                                expected=f"{need} or more calibration images for {method}",
                                fix=f"add images to the folder, raise --calib-count to ≥ {need}, or use "
                                    "--calib-method minmax")
    elif opt.int8 and opt.calib_count is not None and opt.calib_count < quantize.MIN_IMAGES[method]:
        raise SedeployError(f"--calib-count {opt.calib_count} is below what calibration method '{method}' needs "
                            f"({quantize.MIN_IMAGES[method]} images).",
                            fix=f"raise --calib-count to ≥ {quantize.MIN_IMAGES[method]}, or use "
                                "--calib-method minmax")
    if opt.int8:
        check_cache_location(opt.calib_cache)


def check_backend(opt: BuildOptions) -> None:
    """The TensorRT workspace size, and the backend's library installed (exit 4 with the install hint)."""
    if not opt.engine.workspace_gib > 0:
        raise SedeployError(f"--workspace {opt.engine.workspace_gib} is not valid.", expected="a size in GiB > 0",
                            fix="omit --workspace (default 4)")
    if opt.backend != "none":
        require(opt.backend, backend_purpose(opt.backend))  # exit 4 with the install hint, before any work


def check_int8_checks(opt: BuildOptions) -> None:
    """The INT8 check and budget options: only with --int8, extras only with a budget, each value valid."""
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
    check_warn_agreement(opt.warn_agreement)
    if opt.max_fallback is not None and opt.max_fallback < 0:
        raise SedeployError(f"--max-fallback {opt.max_fallback} is not valid.", expected="a whole number ≥ 0")
    check_label_offset(opt.label_offset, None)
    if budget:
        budget_of(opt)  # validates before any work
    if opt.fallback_order is not None:
        check_fallback_order(opt.fallback_order)


def check_label_offset(offset: int | None, classes: int | None, *, path: str = "the model") -> None:
    """``--label-offset``: 0 ≤ offset < the model's number of outputs (``classes``; None: unknown yet)."""
    if offset is None:
        return
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise SedeployError(f"--label-offset {offset!r} is not valid.", expected="a whole number ≥ 0",
                            fix="pass 1 for 1001-class models with a background class at index 0")
    if classes is not None and offset >= classes:
        raise SedeployError(f"--label-offset {offset} is not valid for '{path}', which has {classes} outputs.",
                            expected=f"0 ≤ offset < {classes} (model output k + offset is dataset class k)",
                            fix="pass 1 for 1001-class models with a background class at index 0, else drop "
                                "--label-offset")


def check_engine(engine: EngineOptions, backend: str) -> None:
    """The TensorRT profile (refused whatever the backend: used by trt) and, for trt, its timing cache and
    library."""
    validate_profile(engine.min_batch, engine.opt_batch, engine.max_batch)
    if backend == "trt":
        if engine.timing_cache is not None:
            check_file_target(engine.timing_cache, "TensorRT timing cache (--timing-cache)")
        require_trt(backend_purpose("trt"))


def check_file_target(path: str | Path, what: str) -> None:
    """``path`` can be written as a file: not a folder, in a folder that is (or can be made) writable."""
    p = Path(path)
    if p.is_dir():
        raise SedeployError(f"The {what} '{p}' is a folder.", expected="a file path (it is created if missing)",
                            fix=f"name a file inside it, e.g. {p / 'cache.json'}")
    ensure_writable_dir(p.parent if str(p.parent) else Path("."), f"folder of the {what}",
                        fix="pass a path in a folder you can write to")


def check_cache_location(pinned: str | Path | None) -> None:
    """The calibration cache must be writable before calibrating (not after minutes of work)."""
    if pinned is not None:
        check_file_target(pinned, "calibration cache file (--calib-cache)")
        return
    folder = quantize.default_cache_dir()
    ensure_writable_dir(folder, "calibration cache folder",
                        fix="set SEDEPLOY_CACHE to a writable folder, or pass --calib-cache FILE")
    clean_stale_partials(folder, older_than=time.time(), locked=False)


def budget_of(opt: BuildOptions) -> Budget:
    """The INT8 accuracy budget the options ask for (validated by :class:`~sedeploy.int8_budget.Budget`)."""
    return Budget(max_top1_drop=opt.max_top1_drop, min_agreement=opt.min_agreement,
                  confidence=opt.budget_confidence)

