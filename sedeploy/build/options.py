"""`build-engine`'s options: one record (:class:`BuildOptions`) made of parts along the data flow, every field
checked before any work (a typo must not cost a 1-minute export first).

The parts: :class:`SourceOptions` (which model, its input, preprocessing and labels, SE fusion),
:class:`CalibrationOptions` (the images and estimator of INT8 calibration), :class:`BudgetOptions` (the INT8
accuracy budget), :class:`PrecisionOptions` (which artifacts, their float/INT8 policies, the INT8 check's warning
floor) and the backends' :class:`~sedeploy.backends.EngineOptions` (threads, the TensorRT profile, workspace and
timing cache), passed to the backends as it is. Each part refuses its own bad values with ``check()``;
:meth:`BuildOptions.check` calls them and checks what spans parts (budget options without ``--int8``, the backend
and its library). :meth:`BuildOptions.from_flat` takes every field by its flat name, as the command line has them.
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
from sedeploy.preprocess import Preprocess, check_normalisation, find_images

#: the foreign-model preprocessing options of :class:`SourceOptions` (each replaces its part of the model's own)
PREPROCESS_OVERRIDES = ("mean", "std", "resize", "channel_order", "resize_mode")


@dataclass(frozen=True)
class SourceOptions:
    """The source model's side: which network when no MODEL is given, its input size, batch and preprocessing,
    its label offset, and SE fusion."""

    depth: int | None = None  # no MODEL: the SE-ResNet depth to export (None: the checkpoint's, else 50)
    checkpoint: str | None = None  # no MODEL: weights for the export
    input_shape: tuple[int, int] | None = None  # (H, W) pinning a MODEL's dynamic height and width
    dynamic_batch: bool = False  # a fixed-batch model: make the batch dynamic (refused with the reason if unsafe)
    preprocess: Preprocess | None = None  # None: from the model's metadata, else mmcls defaults at its input size
    # a foreign MODEL's preprocessing, each replacing its part of what the model records (--mean/--std/…)
    mean: tuple[float, float, float] | None = None  # R,G,B on the 0–255 scale (in channel_order)
    std: tuple[float, float, float] | None = None
    resize: int | None = None  # short side before the centre crop
    channel_order: str | None = None  # "rgb" / "bgr"
    resize_mode: str | None = None  # "crop" / "pad"
    label_offset: int | None = None  # model output k + offset is dataset class k (1001-class models: 1); recorded
    fuse_se: bool = True

    def overrides(self) -> dict:
        """The foreign-model preprocessing options given (name → value)."""
        return {k: getattr(self, k) for k in PREPROCESS_OVERRIDES if getattr(self, k) is not None}

    def check(self, model: str | Path | None = None) -> None:
        """Refuse what cannot describe the source; ``model``: the MODEL given (None: the SE-ResNet export)."""
        if model is not None and (self.depth or self.checkpoint):
            raise SedeployError(f"--depth/--checkpoint choose the network to export when no MODEL is given; MODEL "
                                f"'{model}' was given too.",
                                fix="drop --depth/--checkpoint to build from MODEL, or drop MODEL to export")
        if model is None and (self.overrides() or self.input_shape is not None):
            raise SedeployError("--mean/--std/--resize/--channel-order/--resize-mode/--input-shape describe a "
                                "foreign MODEL; none was given.",
                                fix="pass the ONNX file, or drop these options for the SE-ResNet export")
        if self.preprocess is not None and self.overrides():
            raise SedeployError(f"A preprocessing and {', '.join(self.overrides())} were both given.",
                                expected="either a whole Preprocess or the values that replace parts of the "
                                         "model's own",
                                fix="put the values into the Preprocess, or drop it")
        check_normalisation(self.mean, self.std)
        check_label_offset(self.label_offset, None)


@dataclass(frozen=True)
class CalibrationOptions:
    """INT8 calibration: the images, how many, in which batches, the range estimator and the cache."""

    calib: str | Path | None = None  # None: the shipped calib/ folder (said in the log)
    calib_method: str | None = None  # None: quantize.DEFAULT_METHOD
    calib_count: int | None = None  # None: quantize.DEFAULT_COUNT
    calib_seed: int = 0
    calib_batch: int | None = None
    calib_cache: str | Path | None = None

    @property
    def method(self) -> str:
        """The range estimator that runs (the default when none was given)."""
        return self.calib_method or quantize.DEFAULT_METHOD

    def check(self, *, calibrating: bool = True) -> None:
        """The numbers, the method and the folder; ``calibrating`` (--int8): enough images for the method and a
        writable cache too."""
        check_positive(self.calib_batch, "--calib-batch", f"omit it (default {quantize.DEFAULT_BATCH_SIZE})")
        check_positive(self.calib_count, "--calib-count", f"omit it (default {quantize.DEFAULT_COUNT})")
        method = self.method
        if method not in quantize.METHODS:
            raise SedeployError(f"Unknown calibration method '{method}'.",
                                expected=f"one of {', '.join(quantize.METHODS)}",
                                fix=f"omit --calib-method (default {quantize.DEFAULT_METHOD})")
        need = quantize.MIN_IMAGES[method]
        if self.calib is not None:
            found = find_images(self.calib, what="calibration image folder (--calib)")
            usable = min(len(found.paths), self.calib_count or quantize.DEFAULT_COUNT)
            if calibrating and usable < need:
                why = (f"--calib-count {self.calib_count}" if self.calib_count and self.calib_count < len(found.paths)
                       else f"the calibration image folder (--calib) '{found.root}' holds {len(found.paths)}")
                raise SedeployError(f"Calibration method '{method}' needs at least {need} images; {why}.",
                                    expected=f"{need} or more calibration images for {method}",
                                    fix=f"add images to the folder, raise --calib-count to ≥ {need}, or use "
                                        "--calib-method minmax")
        elif calibrating and self.calib_count is not None and self.calib_count < need:
            raise SedeployError(f"--calib-count {self.calib_count} is below what calibration method '{method}' "
                                f"needs ({need} images).",
                                fix=f"raise --calib-count to ≥ {need}, or use --calib-method minmax")
        if calibrating:
            check_cache_location(self.calib_cache)


@dataclass(frozen=True)
class BudgetOptions:
    """The INT8 accuracy budget (:mod:`sedeploy.int8_budget`): either bound turns it on."""

    max_top1_drop: float | None = None  # top-1 points vs FP32 on held-out images (needs labels)
    min_agreement: float | None = None  # top-1 agreement with FP32, percent
    budget_confidence: float | None = None  # meet the budget with one-sided bounds at this confidence
    fallback_order: str | None = None  # sedeploy.int8_budget.FALLBACK_ORDERS; None: its default
    val: str | Path | None = None  # held-out images; None: a seeded split of the calibration folder
    max_fallback: int | None = None  # most layers allowed back in float

    @property
    def enabled(self) -> bool:
        """A budget was asked (either bound)."""
        return self.max_top1_drop is not None or self.min_agreement is not None

    def given(self) -> bool:
        """Any budget option was given (they all concern the INT8 artifacts)."""
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def budget(self) -> Budget:
        """The budget asked for (validated by :class:`~sedeploy.int8_budget.Budget`)."""
        return Budget(max_top1_drop=self.max_top1_drop, min_agreement=self.min_agreement,
                      confidence=self.budget_confidence)

    def check(self) -> None:
        """The budget's extras only with a budget, each value valid."""
        extras = (self.max_fallback, self.budget_confidence, self.fallback_order)
        if any(e is not None for e in extras) and not self.enabled:
            raise SedeployError("--max-fallback / --budget-confidence / --fallback-order were given without a "
                                "budget.", fix="add --min-agreement PCT and/or --max-top1-drop PTS")
        if self.max_fallback is not None and self.max_fallback < 0:
            raise SedeployError(f"--max-fallback {self.max_fallback} is not valid.", expected="a whole number ≥ 0")
        if self.enabled:
            self.budget()  # validates before any work
        if self.fallback_order is not None:
            check_fallback_order(self.fallback_order)


@dataclass(frozen=True)
class PrecisionOptions:
    """Which artifacts beside FP32, what stays float in them, and the INT8 check's warning floor."""

    fp16: bool = False
    int8: bool = False
    se_int8: str | None = None  # None: quantize.DEFAULT_SE_POLICY
    keep_fp32: str | None = None  # None: fp16.DEFAULT_KEEP_FP32
    warn_agreement: float | None = None  # INT8 check: warn below this top-1 agreement, %; None: int8_check default

    def check(self) -> None:
        """The SE and keep-FP32 policies (the latter only with an FP16 or INT8 artifact) and the warning floor."""
        if self.se_int8 is not None and self.se_int8 not in quantize.SE_POLICIES:
            raise SedeployError(f"--se-int8 {self.se_int8} is not valid.",
                                expected=f"one of {', '.join(quantize.SE_POLICIES)}")
        if self.keep_fp32 is not None:
            fp16.parse_keep_fp32(self.keep_fp32)
            if not (self.fp16 or self.int8):
                raise SedeployError(f"--keep-fp32 {self.keep_fp32} chooses what stays FP32 in the FP16 artifact and "
                                    "the TensorRT INT8 form; neither --fp16 nor --int8 was given.",
                                    fix="add --fp16 (and/or --int8), or drop --keep-fp32")
        check_warn_agreement(self.warn_agreement)


#: the parts of :class:`BuildOptions`, by attribute name
PARTS = {"source": SourceOptions, "calibration": CalibrationOptions, "budget": BudgetOptions,
         "precision": PrecisionOptions, "engine": EngineOptions}


@dataclass(frozen=True)
class BuildOptions:
    """Everything `build-engine` can be asked, in parts along the data flow; the defaults are the measured
    recommendations."""

    source: SourceOptions = field(default_factory=SourceOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    budget: BudgetOptions = field(default_factory=BudgetOptions)
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)  # threads, TensorRT profile, workspace, timing cache
    backend: str = "auto"  # "auto": sedeploy.backends.default_cpu_backend() (OpenVINO when it imports, else ORT)
    progress: bool = True
    auto_backend: bool = False  # set by build_engines when --backend auto chose the backend (fallback allowed)

    @classmethod
    def from_flat(cls, **flat) -> BuildOptions:
        """The options from flat keywords, each field by its own name (``int8=``, ``calib=``, ``threads=``,
        ``max_batch=``, ``backend=``, …), as the command line has them."""
        parts = {}
        for name, part in PARTS.items():
            names = {f.name for f in dataclasses.fields(part)}
            parts[name] = part(**{k: flat.pop(k) for k in list(flat) if k in names})
        return cls(**parts, **flat)

    def check(self, model: str | Path | None = None) -> None:
        """Every option, checked before any file is written (a typo must not cost a 1-minute export first): each
        part, then what spans parts, in this order, so that of two mistakes the same one is reported first.
        ``model``: the MODEL given (None: the SE-ResNet export)."""
        self.source.check(model)
        if self.backend not in BUILD_CHOICES:
            raise SedeployError(f"Unknown backend '{self.backend}'.", expected=f"one of {', '.join(BUILD_CHOICES)}",
                                fix="pass --backend ort (ONNX Runtime, runs everywhere), trt (NVIDIA GPU), openvino "
                                    "(CPU) or none (portable artifacts only)")
        check_threads(self.engine.threads)
        self.calibration.check(calibrating=self.precision.int8)
        self.precision.check()
        if not self.engine.workspace_gib > 0:
            raise SedeployError(f"--workspace {self.engine.workspace_gib} is not valid.",
                                expected="a size in GiB > 0", fix="omit --workspace (default 4)")
        if self.backend not in ("none", "auto"):  # (auto: resolved to an installed CPU backend before the build)
            require(self.backend, backend_purpose(self.backend))  # exit 4 with the install hint, before any work
        if (self.budget.given() or self.precision.warn_agreement is not None) and not self.precision.int8:
            raise SedeployError("--min-agreement / --max-top1-drop / --val / --warn-agreement / --max-fallback / "
                                "--budget-confidence / --fallback-order check or budget the INT8 artifacts, "
                                "but --int8 was not given.", fix="add --int8")
        self.budget.check()
        check_engine(self.engine, self.backend)


def check_positive(value, option: str, fix: str) -> None:
    """``value`` is None or a positive integer (``option`` and ``fix`` name it in the error)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SedeployError(f"{option} {value} is not valid.", expected="a positive integer", fix=fix)


def backend_purpose(backend: str) -> str:
    """What the backend's library is needed for (said when it is missing)."""
    return (f"Building {BACKENDS[backend].label} engines (--backend {backend}); the portable ONNX artifacts can be "
            "written anywhere with --backend none and built where the backend is installed")


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
