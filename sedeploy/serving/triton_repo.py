"""``sedeploy package --triton``: a Triton Inference Server model repository from a build-engine folder.

One Triton model per engine that ``manifest.json`` lists (the artifacts when it built none)::

    model_repository/
      tiny_fp32_ort/
        config.pbtxt          platform/backend, max_batch_size, input/output, dynamic batching, instance group
        sedeploy.json         the manifest entry, the engine's sidecar and why each setting was chosen
        tiny.fp32.ort.json    the engine's sidecar, as build-engine wrote it
        1/model.onnx          the engine file (Triton's default file name for the backend)

How each model's ``config.pbtxt`` is chosen (Triton backends, dynamic batching) and checked:
:mod:`sedeploy.serving.triton_config`.

``--artifacts`` packages the portable ONNX artifacts instead of the engines (an ORT engine is tuned for the CPU it
was built on). ``--labels-file`` adds ``labels.txt`` and ``label_filename`` to the output, so any client can ask
Triton's classification extension for the top-k class names (``class_count``) without numpy.

Every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf before the repository is published; the
repository is written in a staging folder and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sedeploy.backends import read_sidecar
from sedeploy.backends.ort import unsupported_here
from sedeploy.bench.engines import describe_engine, preprocess_for
from sedeploy.classes import read_class_names
from sedeploy.errors import SedeployError
from sedeploy.fsutil import folder_lock, missing_dirs, remove_empty_dirs
from sedeploy.layout import ENGINE_SUFFIX, Manifest
from sedeploy.onnxcore import META, get_metadata, holds_fp16_tensors, input_layout, load_onnx, output_kind
from sedeploy.preprocess import recorded_preprocess
from sedeploy.serving.env import require_client
from sedeploy.serving.triton_config import (DEFAULT_MAX_BATCH, ONNX_TO_TRITON, TRITON_BACKENDS, TensorSpec,
                                            TritonModel, batching_policy, parse_config, read_results)

log = logging.getLogger("sedeploy")

__all__ = ["manifest_engines", "engine_io", "plan_models", "package_triton", "format_package", "check_output_folder",
           "is_triton_repository", "model_name", "output_facts", "output_labels", "DEFAULT_MAX_BATCH", "TensorSpec", "TritonModel", "parse_config",
           "read_results"]


# ------------------------------------------------------------------------------------------- reading engines
def manifest_engines(engines_dir: str | Path, *, artifacts: bool = False) -> list[dict[str, Any]]:
    """The manifest's engines (each with resolved ``path``/``sidecar``/``from``: :meth:`Manifest.locate`'s rule),
    or its portable ONNX artifacts as ONNX Runtime models when ``artifacts`` is asked or it built no engines
    (``--backend none``)."""
    d = Path(engines_dir)
    manifest = Manifest.read(d)
    entries = [] if artifacts else manifest.engines
    if not entries:
        entries = [{"path": a["path"], "sidecar": None, "backend": "ort", "precision": a.get("precision"),
                    "kind": a.get("kind"), "flavour": a.get("flavour"), "from": a["path"]}
                   for a in manifest.artifacts]
    if not entries:
        raise SedeployError(f"The manifest of '{d}' lists no engines and no artifacts.",
                            fix="rebuild the folder with `sedeploy build-engine`")
    for e in entries:
        e["path"] = manifest.locate_entry(e)
        e["sidecar"] = manifest.locate(e["sidecar"]) if e.get("sidecar") else None
        source = e.get("from")
        if source and e.get("backend") != "ort":  # a compiled engine's signature is read from its source ONNX
            e["from"] = manifest.locate(source)
        else:  # an ONNX Runtime engine is its own graph: its source is named when it is there
            e["from"] = manifest.find(source) if source else None
    return entries


def _onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    proto = load_onnx(path, weights=False, check=False)
    inits = {t.name for t in proto.graph.initializer}

    def spec(v) -> TensorSpec:
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim]
        elem = v.type.tensor_type.elem_type
        if elem not in ONNX_TO_TRITON:
            raise SedeployError(f"'{path}': tensor '{v.name}' has ONNX element type {elem}, which sedeploy does "
                                "not map to a Triton type.", expected=", ".join(ONNX_TO_TRITON.values()))
        return TensorSpec(v.name, ONNX_TO_TRITON[elem], dims)

    return ([spec(v) for v in proto.graph.input if v.name not in inits], [spec(v) for v in proto.graph.output])


def engine_io(entry: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec], int | None, int | None]:
    """Inputs, outputs, the largest batch the engine takes (None: unlimited) and its tuned batch (plans) —
    read from the ONNX graph (ORT engines, artifacts) or the ONNX the engine was built from plus the sidecar."""
    path, backend = entry["path"], entry["backend"]
    if backend == "ort":
        inputs, outputs = _onnx_io(path)
        n = inputs[0].shape[0] if inputs and inputs[0].shape else -1
        return inputs, outputs, (n if n > 0 else None), None
    source = entry.get("from")
    if source is None or not Path(source).suffix == ".onnx":
        raise SedeployError(f"The ONNX artifact that '{path}' was built from is missing (the manifest names "
                            f"'{entry.get('from')}').", expected="the artifact next to the engine, as build-engine "
                                                                  "wrote it", fix="rebuild the folder with build-engine")
    inputs, outputs = _onnx_io(Path(source))
    if backend == "trt":
        if entry.get("sidecar") is None:
            raise SedeployError(f"The sidecar of the TensorRT plan '{path}' is missing.",
                                fix="rebuild the plan with `sedeploy build-engine --backend trt`")
        profile = read_sidecar(entry["sidecar"], engine=path).get("profile") or {}
        mx, opt = profile.get("max") or [None], profile.get("opt") or [None]
        return inputs, outputs, mx[0], opt[0]
    n = inputs[0].shape[0] if inputs and inputs[0].shape else -1
    return inputs, outputs, (n if n > 0 else None), None


def engine_preprocess(path: Path, inputs: list[TensorSpec]):
    """The engine's preprocessing as sedeploy's bench reads it (:func:`sedeploy.preprocess.recorded_preprocess`:
    model metadata, else mmcls's pipeline at the input's height and width); recorded in config.pbtxt so a client
    needs nothing but the server. When the engine cannot be described, a warning says so and the input's own
    shape (NCHW or NHWC) decides; None for a non-image input."""
    try:
        return preprocess_for(describe_engine(path))
    except SedeployError as err:
        shape = list(inputs[0].shape) if inputs else []
        layout = input_layout(shape)
        hw = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2]) if layout == "NHWC" else None
        if hw is None or min(hw) <= 0:
            log.warning("%s: no preprocessing recorded for it (%s; its input %s is not a fixed-size image).",
                        path.name, err.what, shape)
            return None
        log.warning("The metadata of %s cannot be read (%s): its preprocessing is chosen from its input size.",
                    path.name, err.what)
        return recorded_preprocess(None, hw, name=path.name)


def output_facts(entry: dict[str, Any]) -> tuple[str, int]:
    """What the engine's first output holds (:func:`sedeploy.onnxcore.output_kind`: ``logits``, ``probabilities``
    or ``log_probabilities``) and the label offset its build recorded (``META.LABEL_OFFSET``: output k + offset
    is dataset class k; 0 when none is recorded), read from the engine's ONNX graph or the ONNX it was built from."""
    source = entry["path"] if entry["backend"] == "ort" else entry.get("from")
    if source is None or Path(source).suffix != ".onnx":
        raise SedeployError(f"The ONNX artifact that '{entry['path']}' was built from is missing.",
                            expected="the artifact next to the engine, as build-engine wrote it",
                            fix="rebuild the folder with build-engine")
    proto = load_onnx(Path(source), weights=False, check=False)
    offset = get_metadata(proto).get(META.LABEL_OFFSET, 0)
    try:
        offset = int(offset)
    except (TypeError, ValueError):
        offset = -1
    if offset < 0:
        raise SedeployError(f"'{source}' records the label offset {offset!r}.", expected="an integer ≥ 0",
                            fix="rebuild it with `sedeploy build-engine --label-offset N`")
    return output_kind(proto), offset


def output_labels(labels: list[str], classes: int, offset: int, *, where: str) -> list[str]:
    """One name per model output (Triton's ``labels.txt``): a table naming every output as it is, or one naming
    the dataset's classes when the model has ``offset`` extra outputs first (those are named ``background``)."""
    if len(labels) == classes:
        return list(labels)
    if offset and len(labels) == classes - offset:
        return ["background"] * offset + list(labels)
    want = f"{classes}" + (f" (or {classes - offset}: outputs from {offset} on, label offset {offset})"
                           if offset else "")
    raise SedeployError(f"The labels file has {len(labels)} names, {where} has {classes} classes.",
                        expected=f"{want} names",
                        fix="pass the class-name table of this model (one name per class, in index order)")


# ------------------------------------------------------------------------------------------- the repository
def model_name(engine: Path, backend: str) -> str:
    """``tiny.int8-cpu.ort-opt.onnx`` → ``tiny_int8-cpu_ort``, the portable artifact ``tiny.fp32.onnx`` →
    ``tiny_fp32_onnx`` (Triton model names: letters, digits, _ and -)."""
    stem, tag = engine.name, backend
    for suffix in (*ENGINE_SUFFIX.values(), ".onnx"):
        if stem.endswith(suffix):
            stem, tag = stem[: -len(suffix)], ("onnx" if suffix == ".onnx" else backend)
            break
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{stem}_{tag}")


def plan_models(engines_dir: str | Path, *, results: dict[str, Any] | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                instances: int = 1, artifacts: bool = False, labels: list[str] | None = None) -> list[TritonModel]:
    """Decide every model of the repository (nothing is written)."""
    if max_batch < 1 or instances < 1:
        raise SedeployError(f"max_batch={max_batch}, instances={instances} are not valid.",
                            expected="positive integers", fix="e.g. --max-batch 32 --instances 1")
    models: list[TritonModel] = []
    for e in manifest_engines(engines_dir, artifacts=artifacts):
        if e["backend"] not in TRITON_BACKENDS:
            raise SedeployError(f"Engine '{e['path']}' has backend {e['backend']!r}.",
                                expected=f"one of {', '.join(TRITON_BACKENDS)}")
        inputs, outputs, limit, opt = engine_io(e)
        static = e["backend"] != "trt" and limit is not None  # a fixed-batch ONNX graph: no Triton batching
        if static:
            mb = 0
        elif e["backend"] == "trt":
            mb = int(limit or max_batch)  # the plan's optimization profile decides
        else:
            mb = max_batch
        if static:
            preferred, delay, rule = [], 0, f"fixed batch {limit} in the graph: max_batch_size 0, no dynamic batcher"
        else:
            preferred, delay, rule = batching_policy(e["path"], mb, opt, results)
        pp = engine_preprocess(e["path"], inputs)
        params = {"sedeploy.preprocess": json.dumps(pp.as_dict())} if pp else {}
        params.update({"sedeploy.precision": str(e.get("precision")), "sedeploy.kind": str(e.get("kind"))})
        if e["backend"] == "ort":  # served KIND_CPU (TRITON_BACKENDS)
            if unsupported_here("fp16") is not None and holds_fp16_tensors(e["path"]):
                log.warning("%s holds FP16 tensors; Triton's ONNX Runtime backend on the CPU computes them in FP32 "
                            "here (no FP16 kernels on this CPU): served, but not at FP16 speed or rounding.",
                            e["path"].name)
        kind, offset = output_facts(e)
        params.update({"sedeploy.output_kind": kind, "sedeploy.label_offset": str(offset)})
        classes = outputs[0].shape[-1] if outputs and outputs[0].shape else -1
        names = output_labels(labels, classes, offset, where=f"'{e['path'].name}'") if labels else []
        models.append(TritonModel(model_name(e["path"], e["backend"]), e["path"], e["backend"], e.get("sidecar"), e,
                                  inputs, outputs, mb, preferred, delay, rule, instances, params, names))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SedeployError(f"Two engines map to the same Triton model name: {names}.",
                            fix="package engines of one model per repository, or rename the files")
    return models


def _engine_files(m: TritonModel) -> list[tuple[Path, str]]:
    """(source file, name in the version folder)."""
    files = TRITON_BACKENDS[m.backend]["files"]
    pairs = [(m.engine, files[0])]
    if m.backend == "openvino":
        pairs.append((m.engine.with_name(m.engine.name[: -len(".xml")] + ".bin"), files[1]))
    elif m.backend == "ort":
        data = m.engine.with_name(m.engine.name + ".data")  # external weights keep their recorded file name
        if data.exists():
            pairs.append((data, data.name))
    return pairs


def _write_model(m: TritonModel, root: Path) -> dict[str, Any]:
    d = root / m.name
    (d / "1").mkdir(parents=True)
    text = m.config_text()
    parse_config(text, where=f"{m.name}/config.pbtxt")
    (d / "config.pbtxt").write_text(text, encoding="utf-8")
    if m.labels:
        (d / "labels.txt").write_text("\n".join(m.labels) + "\n", encoding="utf-8")
    for src, name in _engine_files(m):
        if not src.exists():
            raise SedeployError(f"'{src}' (part of the engine '{m.engine}') is missing.",
                                fix="rebuild the folder with build-engine")
        shutil.copy2(src, d / "1" / name)
    sidecar = None
    if m.sidecar is not None:
        shutil.copy2(m.sidecar, d / m.sidecar.name)
        sidecar = read_sidecar(m.sidecar, engine=m.engine)
    info = {"engine": str(m.engine), "manifest_entry": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in m.entry.items()},
            "sidecar": sidecar, "max_batch_size": m.max_batch_size, "preferred_batch_size": m.preferred,
            "max_queue_delay_microseconds": m.queue_delay_us, "batching_rule": m.batching_rule}
    (d / "sedeploy.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return {"name": m.name, "backend": m.backend, "platform": TRITON_BACKENDS[m.backend]["platform"] or None,
            "triton_backend": TRITON_BACKENDS[m.backend]["backend"], "engine": str(m.engine),
            "max_batch_size": m.max_batch_size, "preferred_batch_size": m.preferred,
            "max_queue_delay_microseconds": m.queue_delay_us, "batching_rule": m.batching_rule,
            "instance_kind": TRITON_BACKENDS[m.backend]["kind"], "labels": bool(m.labels),
            "config": str(d / "config.pbtxt")}


def is_triton_repository(folder: str | Path) -> bool:
    """Is ``folder`` a model repository that ``sedeploy package --triton`` wrote (every entry a model folder
    with the ``config.pbtxt`` and ``sedeploy.json`` it writes)? Only such a folder is ever replaced."""
    entries = list(Path(folder).iterdir())
    return bool(entries) and all(e.is_dir() and not e.is_symlink() and (e / "config.pbtxt").is_file()
                                 and (e / "sedeploy.json").is_file() for e in entries)


def check_output_folder(engines_dir: str | Path, out: Path, *, force: bool) -> None:
    """``out`` may be written: not the engines folder, nor inside it, nor around it; a new or empty folder, or a
    previous sedeploy repository when ``force`` is given. Anything else (a file, another folder's content) is the
    user's and is never replaced, even with ``force``."""
    src, dst = Path(engines_dir).resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        where = "is" if dst == src else ("is inside" if src in dst.parents else "contains")
        raise SedeployError(f"The output '{out}' {where} the engines folder '{engines_dir}'.",
                            expected="a repository folder apart from the engines it packages",
                            fix="choose another -o folder, e.g. -o model_repository")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SedeployError(f"The output '{out}' exists and is not a folder.",
                            fix="choose another -o folder (sedeploy never replaces a file, even with --force)")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_triton_repository(out):
        raise SedeployError(f"The output '{out}' is a non-empty folder that is not a sedeploy Triton repository.",
                            fix="choose a new -o folder; --force replaces only a repository that "
                                "`sedeploy package --triton` wrote")
    if not force:
        raise SedeployError(f"The output '{out}' exists and is not empty (a previous repository).",
                            fix="choose a new -o folder, or pass --force to replace it")


def _publish_folder(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder onto ``out``; a previous repository there is moved aside first and
    removed after, or put back when the rename fails or is interrupted."""
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    old = aside / out.name
    try:
        os.replace(out, old)
        os.replace(staging, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def package_triton(engines_dir: str | Path, out_dir: str | Path, *, results: str | Path | None = None,
                   max_batch: int = DEFAULT_MAX_BATCH, instances: int = 1, force: bool = False,
                   artifacts: bool = False, labels_file: str | Path | None = None) -> dict[str, Any]:
    """Write a Triton model repository for every engine of a build-engine folder (see the module docstring).

    ``results``: a bench ``results.json`` whose timings choose the dynamic-batching settings. ``force``: replace
    a previous repository at ``out_dir`` (:func:`check_output_folder` says what is refused). The repository is
    written in a staging folder beside ``out_dir``, under a lock on that folder, and renamed into place whole.
    ``artifacts``: package the portable ONNX artifacts instead of the engines (an ORT engine is tuned for the CPU
    it was built on; a GPU cluster wants the artifacts or TensorRT plans).
    ``labels_file``: class names (``synset_words.txt``) written as ``labels.txt`` for Triton's classification
    extension, so a client can ask the server for the top-k names. Returns a summary (one dict per model).
    """
    require_client("sedeploy package --triton (it validates every config.pbtxt with Triton's ModelConfig)")
    out = Path(out_dir)
    check_output_folder(engines_dir, out, force=force)
    bench = read_results(results) if results is not None else None
    labels = None
    if labels_file is not None:
        labels = read_class_names(labels_file)
    models = plan_models(engines_dir, results=bench, max_batch=max_batch, instances=instances, artifacts=artifacts,
                         labels=labels)
    made = missing_dirs(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out.parent, what="folder", command="sedeploy package"):
            check_output_folder(engines_dir, out, force=force)  # again, now that no other run writes there
            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
            try:
                summary = [_write_model(m, staging) for m in models]
                os.chmod(staging, 0o755)
                _publish_folder(staging, out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        remove_empty_dirs(made)
        raise
    for s in summary:
        s["config"] = str(out / s["name"] / "config.pbtxt")
    return {"repository": str(out), "engines_dir": str(engines_dir), "results": str(results) if results else None,
            "models": summary}


def format_package(res: dict[str, Any]) -> str:
    lines = [f"Triton model repository: {res['repository']}"]
    for m in res["models"]:
        pref = ",".join(map(str, m["preferred_batch_size"])) or "-"
        lines.append(f"  {m['name']:<28} {m['platform'] or m['triton_backend']:<17} {m['instance_kind']:<8} "
                     f"max_batch {m['max_batch_size']:<3} preferred {pref:<8} delay {m['max_queue_delay_microseconds']} us")
    lines.append("Serve it with the Triton container: docker run --gpus all -p8000:8000 -p8001:8001 -p8002:8002 "
                 f"-v $PWD/{Path(res['repository']).name}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
                 "tritonserver --model-repository=/models")
    return "\n".join(lines)
