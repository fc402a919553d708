"""The source model of a build: MODEL checked before any work, or the SE-ResNet export (a matching one reused, else
exported into the staging folder), its graph in canonical form, and its own outputs on the check images."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy import __version__
from sedeploy.build.inputs import foreign_preprocess, model_image_size
from sedeploy.build.options import BuildOptions, SourceOptions, check_label_offset
from sedeploy.build.result import BuildResult
from sedeploy.errors import SedeployError
from sedeploy.export import export_model
from sedeploy.onnxcore import (META, check_input_memory, classifier_output, get_metadata, graph_precision, image_input,
                               load_onnx, run_model)
from sedeploy.onnxcore.session import ort_errors, ort_module
from sedeploy.passes.canonical import canonicalize

log = logging.getLogger("sedeploy")


def check_model_file(model: str | Path, input_shape: tuple[int, int] | None = None):
    """MODEL is an image classifier sedeploy can work on (read without its external weights), at a size that fits
    in memory, checked before any work; returns what was read (:func:`~sedeploy.onnxcore.complete_onnx` makes it
    the full model)."""
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
    if inp.elem_type != 1 and graph_precision(proto) == "fp32":  # a float16 input to float32 compute
        raise SedeployError(f"'{p}' input '{inp.name}' is float16 but the model computes in float32.",
                            expected="float32 images (the input of the float32 model every artifact is built from)",
                            fix="re-export the model with a float32 input (drop the Cast at its input)")
    return proto


def source_for_model(model: str | Path, head, source: SourceOptions) -> SourceOptions:
    """``source`` for MODEL, whose read (:func:`check_model_file`) is ``head``: its label offset checked against
    the model's outputs, and ``--mean/--std/…/--input-shape`` made the model's preprocessing from what was read
    (MODEL is not read again)."""
    check_label_offset(source.label_offset, classifier_output(head, path=str(model)), path=str(model))
    given = source.overrides()
    if source.preprocess is not None or not (given or source.input_shape is not None):
        return source
    pp = foreign_preprocess(model, head=head, input_shape=source.input_shape, **given)
    return dataclasses.replace(source, preprocess=pp, **dict.fromkeys(given))


def matching_export(path: Path, name: str, weights: str):
    """``path`` read without external weights when it is an export of the same network with the same weights by
    this sedeploy version, else None."""
    if not path.is_file():
        return None
    try:
        proto = load_onnx(path, weights=False, check=False)
        dynamic = image_input(proto, path=str(path)).dynamic_batch
    except SedeployError:
        return None
    meta = get_metadata(proto)
    want = {META.MODEL: name, META.WEIGHTS: weights, META.NUM_CLASSES: 1000,
            META.INPUT_SIZE: 224, META.PRECISION: "fp32", META.VERSION: __version__}
    return proto if dynamic and all(str(meta.get(k)) == str(v) for k, v in want.items()) else None


def source_model(out: Path, stage: Path, opt: BuildOptions, res: BuildResult) -> tuple[Path, Any]:
    """No MODEL given: reuse the matching export (./<name>.onnx from `sedeploy export`, or <out>/<name>.onnx), or
    export into the staging folder; either way say which. Returns the model's path and, for a reused export, what
    was read of it (else None)."""
    from sedeploy.model import build_model  # imports torch: only when there is no MODEL

    depth, checkpoint = opt.source.depth, opt.source.checkpoint
    if checkpoint is None:
        name = build_model(depth or 50, seed=None).spec.name
        for candidate in (Path(f"{name}.onnx"), out / f"{name}.onnx"):
            if (head := matching_export(candidate, name, "random (seed 0)")) is not None:
                log.info("No MODEL given: using the existing export %s (%s, random weights, seed 0); pass MODEL to "
                         "choose another file.", candidate, name)
                res.notes.append(f"no MODEL given: reused the matching export {candidate} (same network, random "
                                 "weights seed 0, same sedeploy version)")
                return candidate, head
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
    return final, None


def canonicalize_source(proto, src: Path, res: BuildResult):
    """The input graph in canonical form (sedeploy.passes.canonical), before any other pass; what changed is
    reported. Checked numerically with the fused graph in :func:`fuse_stage` (against the input model)."""
    out, report = canonicalize(proto, label=res.source or str(src))
    res.canonical = report.as_dict()
    if report.changed:
        removed = ", ".join(f"{n} {op}" for op, n in report.removed().items())
        res.notes.append(f"canonicalised the input graph: nodes {report.nodes_before} → {report.nodes_after}"
                         + (f" (folded or fused away: {removed})" if removed else "")
                         + (f"; opset {report.opset_before} → {report.opset_after}"
                            if report.opset_before != report.opset_after else ""))
    return out


def reference_outputs(proto, x: np.ndarray, label: str, static_batch: int | None) -> np.ndarray:
    """The input model's own outputs on the check images, or one clear error naming the model when it cannot
    be a classifier sedeploy can verify: it fails to run (at batch 1, or only at larger batches although its
    batch is dynamic), outputs no classes, or outputs NaN/inf itself."""
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
