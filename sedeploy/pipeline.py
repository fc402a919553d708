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
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy.artifacts import Artifact, artifact_path, artifact_stem
from sedeploy.backends import BACKENDS, EngineOptions
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.fsutil import atomic_write_text, ensure_writable_dir
from sedeploy.onnxcore import META, get_metadata, run_model, save_onnx, set_metadata
from sedeploy.preprocess import Preprocess

log = logging.getLogger("sedeploy")

#: --backend values: a backend of the table, or "none" (portable artifacts only)
BACKEND_CHOICES = (*BACKENDS, "none")
#: fused vs unfused FP32 logits must agree to FUSION_RTOL × max|logit| (at least FUSION_ATOL). The pass computes
#: the same arithmetic, but ReduceMean → GlobalAveragePool sums in another order: on SE-ResNet-50 (|logit| ≈ 35)
#: that moves logits by 2.6e-5, less than ONNX Runtime's own optimization levels do to the unfused graph (3.3e-5).
FUSION_ATOL = 1e-5
FUSION_RTOL = 1e-5
MANIFEST = "manifest.json"


@dataclass
class BuildOptions:
    """Everything `build-engine` can be asked; the defaults are the measured recommendations."""

    fp16: bool = False
    int8: bool = False
    fuse_se: bool = True
    backend: str = "ort"
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


@dataclass
class BuildResult:
    source: str
    out_dir: str
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

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["artifacts"] = [a.as_dict() for a in self.artifacts]
        return d


def default_calib_dir() -> Path:
    from sedeploy.export import DEFAULT_CALIB_DIR

    return DEFAULT_CALIB_DIR


def _check_options(opt: BuildOptions) -> None:
    if opt.backend not in BACKEND_CHOICES:
        raise SedeployError(f"Unknown backend '{opt.backend}'.", expected=f"one of {', '.join(BACKEND_CHOICES)}",
                            fix="pass --backend ort (ONNX Runtime, runs everywhere), trt (NVIDIA GPU), openvino "
                                "(CPU) or none (portable artifacts only)")
    if opt.threads is not None and opt.threads < 1:
        raise SedeployError(f"--threads {opt.threads} is not valid.", expected="a positive integer",
                            fix="omit --threads to use one per physical core")
    if opt.backend == "openvino":
        from sedeploy.backends.openvino import require_openvino

        require_openvino("Building OpenVINO engines (--backend openvino); the portable ONNX artifacts can be "
                         "written anywhere with --backend none and built where OpenVINO is installed")
    if opt.backend == "trt":
        from sedeploy.backends.tensorrt import require_trt, validate_profile

        validate_profile(opt.min_batch, opt.opt_batch, opt.max_batch)
        require_trt("Building TensorRT engines (--backend trt); the portable ONNX artifacts can be written "
                    "anywhere with --backend ort and built on the GPU machine later")


def _preprocess_for(meta: dict[str, Any], height: int, given: Preprocess | None) -> Preprocess:
    if given is not None:
        if given.size != height:
            raise SedeployError(f"The preprocessing crops to {given.size} px but the model's input is {height} px.",
                                fix=f"pass --input-size {height} (or omit it to use the model's input size)")
        return given
    stored = meta.get("sedeploy.preprocess")
    if isinstance(stored, dict):
        try:
            return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
        except TypeError:
            log.warning("Ignoring unreadable preprocessing metadata %s; using the mmcls pipeline at %d px.",
                        stored, height)
    return Preprocess.for_size(height)




def _check_images(pp: Preprocess, folder: Path | None, limit: int = 8) -> np.ndarray:
    from sedeploy.preprocess import load_folder, smooth_noise

    images, _ = load_folder(folder or default_calib_dir(), pp, limit=limit, what="verification image folder")
    return np.concatenate([images, smooth_noise(2, pp.size, seed=1)]).astype(np.float32)


def _fuse(proto, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> Path:
    from sedeploy.backends.ort import optimized_graph_histogram

    fp32_path = artifact_path(out, stem, "fp32")
    if not opt.fuse_se:
        res.notes.append("SE fusion skipped (--no-fuse-se): the FP32 artifact is the input graph")
        set_metadata(proto, {META.PRECISION: "fp32", META.SE_FUSED: 0})
        return save_onnx(proto, fp32_path)
    from sedeploy.passes import fuse_se_blocks

    t0 = time.perf_counter()
    fused, report = fuse_se_blocks(proto)
    res.se_blocks_found, res.se_blocks_fused = report.found, report.fused
    x = _check_images(pp, Path(opt.calib) if opt.calib else None)
    before = run_model(proto, x)
    diff = float(np.abs(before - run_model(fused, x)).max())
    tol = max(FUSION_ATOL, FUSION_RTOL * float(np.abs(before).max()))
    if not diff <= tol:
        raise VerificationError(f"The SE-fused graph differs from the input graph by max |Δlogit| {diff:.3g} "
                                f"> {tol:.3g} (1e-5 × max |logit|); nothing was written.",
                                fix="report this as a bug with the model; --no-fuse-se builds without the pass")
    set_metadata(fused, {META.PRECISION: "fp32", META.SE_FUSED: report.fused, META.SE_FORM: report.form})
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


def _fp16(fp32_path: Path, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> None:
    from sedeploy import fp16

    t0 = time.perf_counter()
    keep = fp16.DEFAULT_KEEP_FP32 if opt.keep_fp32 is None else opt.keep_fp32
    path = artifact_path(out, stem, "fp16")
    report = fp16.convert_fp16(fp32_path, path, keep_fp32=keep,
                                    verify_inputs=_check_images(pp, Path(opt.calib) if opt.calib else None))
    res.timings["fp16_s"] = round(time.perf_counter() - t0, 2)
    res.artifacts.append(Artifact(path, "fp16", None, report.as_dict()))


def _int8(fp32_path: Path, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> None:
    from sedeploy import calibration, int8
    from sedeploy.checks import check_trt_qdq, format_report

    if opt.calib is None:
        log.info("--int8 without --calib: calibrating on the %s images shipped in %s (pass --calib DIR with "
                 "images like the deployment data for better ranges)", "sample", default_calib_dir())
        res.notes.append(f"calibrated on the shipped sample images in {default_calib_dir()} (no --calib given)")
    folder = Path(opt.calib) if opt.calib else default_calib_dir()
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in {"method": opt.calib_method, "count": opt.calib_count,
                                "batch_size": opt.calib_batch}.items() if v is not None}
    calib = calibration.calibrate(fp32_path, folder, seed=opt.calib_seed, cache_path=opt.calib_cache,
                                  progress=opt.progress, preprocess=pp, **kwargs)
    res.timings["calibrate_s"] = round(time.perf_counter() - t0, 2)
    res.calibration = {"folder": str(folder), "images": len(calib.images), "skipped": list(calib.skipped),
                       "method": calib.method, "params": calib.params, "seed": opt.calib_seed,
                       "cache_hit": calib.cache_hit, "cache_path": calib.cache_path, "key": calib.key,
                       "seconds": calib.seconds}
    se = int8.DEFAULT_SE_POLICY if opt.se_int8 is None else opt.se_int8
    # the OpenVINO form only when OpenVINO engines are built (ORT and TensorRT have their own forms)
    for flavour in ("trt", "cpu", *(("ov",) if opt.backend == "openvino" else ())):
        t0 = time.perf_counter()
        path = artifact_path(out, stem, f"int8-{flavour}")
        report = int8.quantize_model(fp32_path, calib, path, flavour=flavour, se=se)
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
    """An engine per artifact of a kind the backend is meant for; ``given``: the input was an artifact made
    elsewhere, built as asked whatever its kind (the backend refuses, with the reason, one it cannot read)."""
    from sedeploy.backends import build_engine

    if opt.backend == "none":
        return
    table = BACKENDS[opt.backend]
    for art in res.artifacts:
        if not given and art.kind not in table.kinds and art.kind != "int8":  # "int8": unknown flavour, built as given
            res.notes.append(f"{art.path.name}: written as a portable artifact; no {table.label} engine is built "
                             f"from it (the {art.kind} form is meant for another backend)")
            continue
        t0 = time.perf_counter()
        eng = build_engine(opt.backend, art.path, out, _engine_options(opt))
        res.timings[f"engine_{art.kind}_s"] = round(time.perf_counter() - t0, 2)
        res.engines.append({**eng.as_dict(), "from": str(art.path), "kind": art.kind, "flavour": art.flavour})


def _check_artifact_for_backend(art: Artifact, backend: str) -> None:
    """An INT8 artifact given as MODEL must be the form its backend reads, checked before any build."""
    if backend != "trt" or art.precision != "int8":
        return
    if art.flavour == "cpu":
        raise SedeployError(f"'{art.path}' is the INT8 CPU form (ONNX Runtime QOperator ops such as QLinearConv), "
                            "which TensorRT's ONNX parser does not import.",
                            expected="the TensorRT INT8 artifact (<model>.int8-trt.onnx, Q/DQ)",
                            fix="pass the .int8-trt.onnx written by the same build-engine run")
    from sedeploy.checks import check_trt_qdq, format_report

    report = check_trt_qdq(art.path)
    if not report.ok:
        raise VerificationError(f"'{art.path}' breaks TensorRT's Q/DQ rules; no engine was built.\n"
                                f"{format_report(report, precision=False)}",
                                fix="rebuild the INT8 artifact with `sedeploy build-engine MODEL --int8`")


def build_engines(model: str | Path | None, out_dir: str | Path, options: BuildOptions | None = None, *,
                  depth: int = 50, checkpoint: str | None = None) -> BuildResult:
    """Run the whole `build-engine` job; see the module docstring. ``model=None`` exports ``depth`` first."""
    from sedeploy.onnxcore import image_input, load_onnx

    opt = options or BuildOptions()
    t_all = time.perf_counter()
    _check_options(opt)
    out = ensure_writable_dir(out_dir)
    res = BuildResult(source="", out_dir=str(out))
    if model is None:
        from sedeploy.export import export_model
        from sedeploy.model import build_model

        name = build_model(depth, seed=None).spec.name
        t0 = time.perf_counter()
        exp = export_model(depth=depth, checkpoint=checkpoint, output=out / f"{name}.onnx")
        res.export = exp.as_dict()
        res.timings["export_s"] = round(time.perf_counter() - t0, 2)
        model = exp.path
    src = Path(model)
    res.source = str(src)
    proto = load_onnx(src)
    inp = image_input(proto, path=str(src))
    meta = get_metadata(proto)
    pp = _preprocess_for(meta, inp.height, opt.preprocess)
    given = Artifact.from_file(src, proto)
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
        fp32_path = _fuse(proto, out, stem, opt, pp, res)
        res.artifacts.append(Artifact(fp32_path, "fp32"))
        if opt.fp16:
            _fp16(fp32_path, out, stem, opt, pp, res)
        if opt.int8:
            _int8(fp32_path, out, stem, opt, pp, res)
    _build_engines(res, out, opt, given=given.precision != "fp32")
    res.timings["total_s"] = round(time.perf_counter() - t_all, 2)
    atomic_write_text(out / MANIFEST, json.dumps(res.as_dict(), indent=2, default=str) + "\n")
    return res


def format_result(res: BuildResult) -> str:
    """The human-readable summary `build-engine` prints."""
    lines = [f"source      {res.source}"]
    if res.se_blocks_found is not None:
        f = res.fusion or {}
        reorders = f.get("ort_reorders")
        lines.append(f"SE fusion   {res.se_blocks_fused}/{res.se_blocks_found} blocks fused, nodes "
                     f"{f.get('nodes_before')} → {f.get('nodes_after')}, max |Δlogit| vs unfused "
                     f"{f.get('max_abs_diff_vs_unfused', float('nan')):.1e}"
                     + (f"; ORT layout reorders {reorders}" if reorders is not None else ""))
    if res.calibration:
        c = res.calibration
        lines.append(f"calibration {c['method']} on {c['images']} images from {c['folder']}"
                     f" ({'cache hit' if c['cache_hit'] else 'computed'}, {c['seconds']:.1f} s)")
    if res.validation is not None:
        lines.append(f"TensorRT Q/DQ rules: {'pass' if res.validation.get('ok') else 'FAIL'}")
    lines.append("artifacts (portable ONNX):")
    for a in res.artifacts:
        lines.append(f"  {a.kind:<22} {a.path}")
    if res.engines:
        lines.append("engines:")
        for e in res.engines:
            lines.append(f"  {e['backend']:<11} {e['precision']:<10} {e['path']}")
    for n in res.notes:
        lines.append(f"note: {n}")
    lines.append(f"time        {res.timings.get('total_s', 0):.1f} s "
                 + " ".join(f"{k[:-2]}={v:.1f}s" for k, v in res.timings.items() if k != "total_s"))
    return "\n".join(lines)
