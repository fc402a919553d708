"""The whole `build-engine` job: options checked, the output folder locked, the stages run in a staging folder,
the finished set published (see :mod:`sedeploy.build`)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from sedeploy.artifacts import Artifact, artifact_stem
from sedeploy.backends import BACKENDS, resolve_backend
from sedeploy.build.engines import check_artifact_for_backend, engines_stage
from sedeploy.build.inputs import prepare_input, preprocess_for, shape_report
from sedeploy.build.options import BuildOptions, check_label_offset
from sedeploy.build.publish import name_intermediates, publish
from sedeploy.build.quantize import int8_stage
from sedeploy.build.result import BuildResult
from sedeploy.build.source import canonicalize_source, check_model_file, source_for_model, source_model
from sedeploy.build.stages import dynamic_batch, fp16_stage, fuse_stage
from sedeploy.errors import SedeployError
from sedeploy.fsutil import (clean_stale_partials, ensure_writable_dir, folder_lock, missing_dirs, remove_empty_dirs,
                             staging_folder)
from sedeploy.onnxcore import (META, classifier_output, complete_onnx, get_metadata, image_input, load_onnx,
                               set_metadata)

log = logging.getLogger("sedeploy")


def build_engines(model: str | Path | None, out_dir: str | Path, options: BuildOptions | None = None) -> BuildResult:
    """Run the whole `build-engine` job; see :mod:`sedeploy.build`. ``model=None`` uses a matching export of the
    SE-ResNet of ``options.source.depth`` (default 50, or the checkpoint's depth) when one is there, else exports
    it first.

    Every option is validated first; then, under an exclusive lock on ``out_dir``, everything is written into a
    staging folder inside it and published as one set with its manifest. On any failure or interruption the
    staging folder is removed and the folder keeps its previous set."""
    opt = options or BuildOptions()
    t_all = time.perf_counter()
    started = time.time()
    opt.source.check(model)  # what describes the source, before MODEL is read (its refusals come first)
    head = None  # MODEL read once without external weights: checked here, completed in the staged build
    if model is not None:
        head = check_model_file(model, opt.source.input_shape)
        opt = dataclasses.replace(opt, source=source_for_model(model, head, opt.source))
    if opt.backend == "auto":
        chosen = resolve_backend(opt.backend)
        kind = Artifact.from_file(model, head).kind if model is not None else "fp32"
        if kind not in BACKENDS[chosen].kinds:  # an artifact made for another CPU backend (int8-cpu: ORT's form)
            chosen = next((n for n, b in BACKENDS.items() if kind in b.kinds and b.device != "gpu"), chosen)
        opt = dataclasses.replace(opt, backend=chosen, auto_backend=True)
        log.info("--backend auto: building %s engines (OpenVINO when it imports on x86-64, else ONNX Runtime; the "
                 "CPU backend an INT8 artifact given as MODEL was made for)", BACKENDS[opt.backend].label)
    opt.check(model)
    made = missing_dirs(out_dir)  # -o and any parents this run creates: removed again if it fails
    try:
        out = ensure_writable_dir(out_dir, "output folder", fix="choose another output folder (-o DIR) or fix its "
                                                                "permissions")
        return locked_build(model, head, out, opt, started, t_all, created=bool(made))
    except BaseException:
        remove_empty_dirs(made)
        raise


def locked_build(model, head, out: Path, opt: BuildOptions, started: float, t_all: float, *,
                 created: bool = False) -> BuildResult:
    """The build under the output folder's lock, staged and published; a folder this run created is removed again
    when it fails."""
    with folder_lock(out, what="output folder", command="build-engine"):
        try:
            clean_stale_partials(out, older_than=started)
            with staging_folder(out) as stage:  # (staging folders of killed runs go first: we hold the lock)
                try:
                    res = build_staged(model, head, out, stage, opt)
                except SedeployError as err:
                    name_intermediates(err, stage, model)
                    raise
                res.timings["total_s"] = round(time.perf_counter() - t_all, 2)
                publish(stage, out, res)
        except BaseException:
            if created:  # a folder this run made (and holds the lock on) and left empty is not left behind
                with contextlib.suppress(OSError):
                    out.rmdir()  # (only when empty)
            raise
    return res


def build_staged(model, head, out: Path, stage: Path, opt: BuildOptions) -> BuildResult:
    """Every stage, written into ``stage``: the source model (MODEL, whose read without external weights is
    ``head``, or the SE-ResNet export), its FP32/FP16/INT8 artifacts, the engines."""
    res = BuildResult(source="", out_dir=str(out))
    if model is not None:
        src = Path(model)
    else:
        src, head = source_model(out, stage, opt, res)
    res.source = str(out / src.name) if src.parent == stage else str(src)
    proto = load_onnx(src) if head is None else complete_onnx(head, src)
    offset = opt.source.label_offset
    check_label_offset(offset, classifier_output(proto, path=str(src)), path=str(src))
    if offset is not None:  # travels with every artifact and engine (bench scores with it)
        set_metadata(proto, {META.LABEL_OFFSET: offset})
        res.label_offset = offset
    given = Artifact.from_file(src, proto)
    if given.precision == "fp32":
        proto, inp, changes = prepare_input(proto, opt, src, res)
    else:  # an artifact used as is: its engine and every consumer take the layout it has
        inp, changes = image_input(proto, path=str(src)), None
    meta = get_metadata(proto)
    res.weights = str(meta.get(META.WEIGHTS) or "unknown (not a sedeploy export)")
    pp = preprocess_for(meta, (inp.height, inp.width), opt.source.preprocess, res)
    res.shapes = shape_report(proto, inp, changes, pp)
    stem = artifact_stem(src)

    if given.precision != "fp32":  # an artifact made elsewhere: build its engine only
        if opt.precision.fp16 or opt.precision.int8:
            raise SedeployError(f"'{src}' is already an {given.precision.upper()} artifact; --fp16/--int8 convert "
                                "an FP32 model.", fix=f"pass the FP32 model, or drop --fp16/--int8 to build the "
                                                      f"{BACKENDS[opt.backend].label} engine of this artifact as it "
                                                      "is")
        check_artifact_for_backend(given, opt.backend, proto)
        res.artifacts.append(given)
        res.notes.append(f"input is a {given.kind} artifact: used as is (no SE fusion, no conversion)")
    else:
        proto = dynamic_batch(proto, opt, res, early=True)  # before canonicalisation folds Shape(input)
        canonical = canonicalize_source(proto, src, res)
        fp32_path = fuse_stage(canonical, stage, stem, opt, pp, res,
                               reference=proto if res.canonical["changed"] else None, label=res.source)
        res.artifacts.append(Artifact(res.published(fp32_path), "fp32"))
        if opt.precision.fp16:
            fp16_stage(fp32_path, stage, stem, opt, pp, res)
        if opt.precision.int8:
            int8_stage(fp32_path, stage, stem, opt, pp, res)
    engines_stage(res, stage, opt, given=proto if given.precision != "fp32" else None)
    return res
