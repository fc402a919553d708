"""The float stages: the SE-fused FP32 artifact (numerically checked against the input model, and the canonical
graph against it), ``--dynamic-batch``, and the FP16 artifact."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sedeploy import fp16
from sedeploy.artifacts import Artifact, artifact_path
from sedeploy.backends.ort import optimized_graph_histogram
from sedeploy.build.inputs import check_images
from sedeploy.build.options import BuildOptions
from sedeploy.build.result import BuildResult
from sedeploy.build.source import reference_outputs
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.onnxcore import META, run_model, save_onnx, set_metadata
from sedeploy.passes import fuse_se_blocks, make_batch_dynamic
from sedeploy.passes.canonical import canonicalize
from sedeploy.preprocess import Preprocess


#: fused vs unfused FP32 logits must agree to FUSION_RTOL × max|logit| (at least FUSION_ATOL). The pass computes
#: the same arithmetic, but ReduceMean → GlobalAveragePool sums in another order: on SE-ResNet-50 (|logit| ≈ 35)
#: that moves logits by 2.6e-5, less than ONNX Runtime's own optimization levels do to the unfused graph (3.3e-5).
FUSION_ATOL = 1e-5


FUSION_RTOL = 1e-5


def fuse_stage(proto, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult, *, reference=None,
               label: str = "model") -> Path:
    fp32_path = artifact_path(out, stem, "fp32")
    reference = proto if reference is None else reference
    calib = opt.calibration.calib
    x = check_images(pp, Path(calib) if calib else None)
    before = reference_outputs(reference, x, label, (res.shapes or {}).get("static_batch"))
    tol = max(FUSION_ATOL, FUSION_RTOL * float(np.abs(before).max()))
    if reference is not proto:  # the canonical graph must compute what the input model computes
        diff = float(np.abs(before - run_model(proto, x)).max())
        if res.canonical is not None:
            res.canonical.update(max_abs_diff_vs_input=diff, tolerance=tol)
        if not diff <= tol:
            raise VerificationError(f"The canonicalised graph of '{label}' differs from it by max |Δ| {diff:.3g} "
                                    f"> {tol:.3g}; nothing was written.",
                                    fix="report this as a sedeploy bug with the model")
    if not opt.source.fuse_se:
        res.notes.append("SE fusion skipped (--no-fuse-se): the FP32 artifact is the input graph")
        proto = dynamic_batch(proto, opt, res)
        set_metadata(proto, {META.PRECISION: "fp32", META.SE_FUSED: 0, META.PREPROCESS: pp.as_dict()})
        return save_onnx(proto, fp32_path)
    t0 = time.perf_counter()
    fused, report = fuse_se_blocks(proto)
    res.se_blocks_found, res.se_blocks_fused = report.found, report.fused
    diff = float(np.abs(before - run_model(fused, x)).max())
    if not diff <= tol:
        raise VerificationError(f"The SE-fused graph differs from the input graph by max |Δlogit| {diff:.3g} "
                                f"> {tol:.3g} (1e-5 × max |logit|); nothing was written.",
                                fix="report this as a bug with the model; --no-fuse-se builds without the pass")
    fused = dynamic_batch(fused, opt, res)
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
        said = err.what.replace(str(fp32_path), str(res.published(fp32_path)))  # the file as it is published
        res.notes.append(f"ORT optimized-graph histogram unavailable: {said}")
    return fp32_path


def dynamic_batch(proto, opt: BuildOptions, res: BuildResult, *, early: bool = False):
    """--dynamic-batch: the model with its fixed batch renamed to N, or a clear refusal (nothing is written).

    ``early``: the input graph, before canonicalisation folds ``Shape(input)`` into the literal batch (a
    batch-generic ``x.view(x.size(0), -1)`` stays generic only there); when it cannot be made dynamic yet, it is
    returned as is and the SE-fused graph is tried again (SE fusion removes batch-dependent SE reshapes)."""
    if "→" in str((res.shapes or {}).get("batch_handling") or ""):
        return proto  # made dynamic already (early)
    if not opt.source.dynamic_batch or not (res.shapes or {}).get("static_batch"):
        if opt.source.dynamic_batch and not early:
            res.notes.append("--dynamic-batch: the batch is already dynamic")
        return proto
    # early: proven on the canonical form of the renamed graph (constant subgraphs folded, Shape(input) kept)
    dyn, why = make_batch_dynamic(proto, normalize=(lambda m: canonicalize(m, label=res.source)[0]) if early
                                  else None)
    if dyn is None and early:
        return proto
    if dyn is None:
        raise SedeployError(f"--dynamic-batch: the batch of '{res.source}' cannot be made dynamic safely: {why}.",
                            expected="a graph without batch-dependent constants (after SE fusion)",
                            fix="drop --dynamic-batch: the model then runs at its fixed batch (larger batches are "
                                "chunked), or re-export it with a dynamic batch")
    res.shapes = {**res.shapes, "input": ["N", *res.shapes["input"][1:]], "static_batch": None,
                  "batch_handling": f"fixed batch {res.shapes['static_batch']} → {why}"}
    return dyn


def fp16_stage(fp32_path: Path, out: Path, stem: str, opt: BuildOptions, pp: Preprocess, res: BuildResult) -> None:
    t0 = time.perf_counter()
    keep = fp16.DEFAULT_KEEP_FP32 if opt.precision.keep_fp32 is None else opt.precision.keep_fp32
    calib = opt.calibration.calib
    path = artifact_path(out, stem, "fp16")
    report = fp16.convert_fp16(fp32_path, path, keep_fp32=keep,
                                    verify_inputs=check_images(pp, Path(calib) if calib else None))
    res.timings["fp16_s"] = round(time.perf_counter() - t0, 2)
    res.artifacts.append(Artifact(res.published(path), "fp16", None,
                                  {**report.as_dict(), "path": str(res.published(path))}))
