"""The engines of the chosen backend from the artifacts (the ``--backend auto`` fallback when its library cannot
compile one), then the INT8 check."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from sedeploy.artifacts import Artifact
from sedeploy.backends import BACKENDS, BackendCompileError, build_engine, fallback_backend, unsupported_here
from sedeploy.backends.tensorrt import validate_trt_input
from sedeploy.build.options import BuildOptions
from sedeploy.build.quantize import int8_check_stage
from sedeploy.build.result import BuildResult
from sedeploy.errors import SedeployError
from sedeploy.onnxcore import holds_fp16_tensors

log = logging.getLogger("sedeploy")


def engines_stage(res: BuildResult, stage: Path, opt: BuildOptions, *, given=None) -> None:
    """Engines of the chosen backend, built into the staging folder ``stage`` and recorded with their published
    paths. In a full build the INT8 form meant for another backend is only written; an artifact the user gave as
    MODEL is built as asked (``given``: that MODEL as read, not read again), with a note when its form is not the
    one this backend runs best (``check_artifact_for_backend`` has refused the forms a backend cannot read)."""
    if opt.backend == "none":
        int8_check_stage(res, opt, stage)
        return
    table = BACKENDS[opt.backend]
    for art in res.artifacts:
        if art.kind not in table.kinds and art.kind != "int8":  # "int8": unknown flavour, built as given
            if given is None:
                res.notes.append(f"{art.path.name}: written as a portable artifact; no {table.label} engine is "
                                 f"built from it (the {art.kind} form is meant for another backend)")
                continue
            fp16_parts = False
            if art.kind == "int8-trt":
                fp16_parts = unsupported_here(opt.backend, "fp16") is not None and holds_fp16_tensors(given)
            res.notes.append(f"{art.path.name}: the {art.kind} form is meant for another backend; built for "
                             f"{table.label} as asked (it runs, but not in the form {table.label} runs fastest"
                             + (f"; its FP16 parts compute in FP32 here: {table.label} has no FP16 kernels on this "
                                "CPU" if fp16_parts else "") + ")")
        why = unsupported_here(opt.backend, art.precision)
        if why is not None and given is None:  # an artifact given as MODEL is refused by the builder, with the reason
            res.notes.append(f"{art.path.name}: written as a portable artifact; no {table.label} engine is built "
                             f"from it: {why}")
            continue
        t0 = time.perf_counter()
        fallback = None
        try:
            eng = build_engine(opt.backend, staged(art, stage, given is not None), stage, opt.engine,
                               source_as=art.path)
        except BackendCompileError as err:
            eng, art, fallback = engine_fallback(err, art, res, stage, opt, given is not None)
        res.timings[f"engine_{art.kind}_s"] = round(time.perf_counter() - t0, 2)
        res.engines.append({**eng.as_dict(), "path": str(res.published(eng.path)),
                            "sidecar": str(res.published(eng.sidecar)),
                            "files": [str(res.published(f)) for f in eng.files], "from": str(art.path),
                            "kind": art.kind, "flavour": art.flavour,
                            "graph_rewrites": dict((eng.metadata or {}).get("graph_rewrites") or {}),
                            **({"fallback": fallback} if fallback else {})})
    int8_check_stage(res, opt, stage)


def staged(art: Artifact, stage: Path, given: bool) -> Path:
    """The file an engine is built from: the MODEL itself when it was given as an artifact (``given``), else the
    artifact as this build wrote it in the staging folder (``art.path`` is where it is published)."""
    return Path(art.path) if given else stage / Path(art.path).name


def engine_fallback(err, art: Artifact, res: BuildResult, stage: Path, opt: BuildOptions, given: bool = False):
    """The backend's library refused to compile ``art``. Under ``--backend auto``: that precision's engine on the
    backend table's fallback (ONNX Runtime), from the artifact of the same precision in its form, said in a
    warning and the result; returns (engine, the artifact it was built from, what happened). With an explicit
    ``--backend``: one error whose fix is another backend (nothing is published)."""
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
    eng = build_engine(other, staged(src, stage, given), stage, opt.engine, source_as=src.path)
    said = (f"{name}: {row.label} cannot compile it ({err.reason}); --backend auto built its {src.precision.upper()} "
            f"engine on {target.label} from {Path(src.path).name} instead (the artifact is kept; every other engine "
            f"is {row.label}'s). Please report the {row.label} failure at {row.issues} with that file")
    log.warning(said)
    res.notes.append(said)
    return eng, src, {"backend": opt.backend, "artifact": name, "reason": err.reason, "report": row.issues,
                      "built_on": other}


def check_artifact_for_backend(art: Artifact, backend: str, model=None) -> None:
    """An artifact given as MODEL must be one its backend reads, checked before any build (for TensorRT by the
    backend's own :func:`~sedeploy.backends.tensorrt.validate_trt_input`: QOperator CPU form refused, Q/DQ rules,
    strong typing); ``model``: the artifact as read already (not read again)."""
    if backend != "trt":
        return
    validate_trt_input(art.path, model)
