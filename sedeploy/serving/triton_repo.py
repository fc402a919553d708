"""``sedeploy package --triton``: a Triton Inference Server model repository from a build-engine folder.

One Triton model per engine that ``manifest.json`` lists (the artifacts when it built none)::

    model_repository/
      tiny_fp32_ort/
        config.pbtxt          platform/backend, max_batch_size, input/output, dynamic batching, instance group
        sedeploy.json         the manifest entry, the engine's sidecar and why each setting was chosen
        tiny.fp32.ort.json    the engine's sidecar, as build-engine wrote it
        1/model.onnx          the engine file (Triton's default file name for the backend)

Backends (Triton's names): TensorRT plans → platform ``tensorrt_plan`` (instance ``KIND_GPU``); ONNX artifacts and
ONNX Runtime engines → platform ``onnxruntime_onnx`` (``KIND_CPU``); OpenVINO IR → backend ``openvino``
(``model.xml`` + ``model.bin``, ``KIND_CPU``).

Dynamic batching: ``max_batch_size`` is the TensorRT profile's max for plans, the static batch of a fixed-batch
ONNX graph (then ``max_batch_size: 0`` and the batch is part of ``dims``), else ``max_batch`` (default 32). With a
bench ``results.json`` (``sedeploy bench ENGINES --out DIR``), the preferred batch sizes are the measured batch
sizes (≤ max_batch_size) whose throughput is at least 90 % of the engine's best, and the queue delay is half the
engine's median batch-1 latency (clamped to 100 µs … 10 ms): a request waits at most half of what serving it alone
costs for company. Without results the defaults are the profile's opt batch (plans) or min(8, max_batch_size),
and a 100 µs delay. ``sedeploy.json`` records which rule chose the values.

``--artifacts`` packages the portable ONNX artifacts instead of the engines (an ORT engine is tuned for the CPU it
was built on). ``--labels-file`` adds ``labels.txt`` and ``label_filename`` to the output, so any client can ask
Triton's classification extension for the top-k class names (``class_count``) without numpy.

Every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``)
before the repository is published; the repository is written in a staging folder and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sedeploy.layout import ENGINE_SUFFIX, MANIFEST
from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy")

DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 100
NEAR_BEST = 0.90  # a batch size is "preferred" when its throughput is ≥ 90 % of the best measured
DELAY_BOUNDS_US = (100, 10_000)

#: Triton's names per sedeploy backend: (platform, backend, default model file(s), instance kind)
TRITON_BACKENDS: dict[str, dict[str, Any]] = {
    "trt": {"platform": "tensorrt_plan", "backend": "tensorrt", "files": ("model.plan",), "kind": "KIND_GPU"},
    "ort": {"platform": "onnxruntime_onnx", "backend": "onnxruntime", "files": ("model.onnx",), "kind": "KIND_CPU"},
    "openvino": {"platform": "", "backend": "openvino", "files": ("model.xml", "model.bin"), "kind": "KIND_CPU"},
}

#: ONNX TensorProto element type → Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # Triton TYPE_*
    shape: list  # full shape; ints for static dims, -1 for dynamic ones

    def dims(self, batched: bool) -> list[int]:
        return [int(d) for d in (self.shape[1:] if batched else self.shape)]


@dataclass
class TritonModel:
    """One model of the repository, before it is written."""

    name: str
    engine: Path
    backend: str  # sedeploy backend key
    sidecar: Path | None
    entry: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    preferred: list[int] = field(default_factory=list)
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    batching_rule: str = ""
    instances: int = 1
    parameters: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # class names: Triton's classification extension (top-k)

    def config_text(self, *, backend: str | None = None) -> str:
        """config.pbtxt in protobuf text format. ``backend``: run the model on that Triton backend instead of the
        engine's native one (``sedeploy serve`` uses ``python``: the engine runs through sedeploy's runner)."""
        tb = TRITON_BACKENDS[self.backend] if backend is None else {"platform": "", "backend": backend,
                                                                    "kind": "KIND_CPU"}
        batched = self.max_batch_size > 0
        lines = [f'name: "{self.name}"']
        lines.append(f'platform: "{tb["platform"]}"' if tb["platform"] else f'backend: "{tb["backend"]}"')
        lines.append(f"max_batch_size: {self.max_batch_size}")
        for key, tensors in (("input", self.inputs), ("output", self.outputs)):
            for k, t in enumerate(tensors):
                dims = ", ".join(str(d) for d in t.dims(batched))
                label = '\n  label_filename: "labels.txt"' if key == "output" and k == 0 and self.labels else ""
                lines.append(f'{key} {{\n  name: "{t.name}"\n  data_type: {t.dtype}\n  dims: [ {dims} ]{label}\n}}')
        if batched:
            pref = "".join(f"\n  preferred_batch_size: {b}" for b in self.preferred)
            lines.append(f"dynamic_batching {{{pref}\n  max_queue_delay_microseconds: {self.queue_delay_us}\n}}")
        lines.append(f'instance_group {{\n  count: {self.instances}\n  kind: {tb["kind"]}\n}}')
        for k, v in self.parameters.items():
            lines.append(f'parameters {{\n  key: "{k}"\n  value {{ string_value: {json.dumps(v)} }}\n}}')
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- validation
def parse_config(text: str, *, where: str = "config.pbtxt"):
    """Parse ``text`` with Triton's ModelConfig protobuf; a clear error when Triton would reject it."""
    from google.protobuf import text_format
    from google.protobuf.text_format import ParseError

    from sedeploy.serving.env import require_client

    require_client("Validating Triton model configurations")
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except ParseError as err:
        raise SedeployError(f"{where} does not parse as Triton's ModelConfig: {err}",
                            fix="this is a sedeploy bug; please report it with the engine's sidecar") from err
    return cfg


# ------------------------------------------------------------------------------------------- reading engines
def read_manifest(engines_dir: str | Path) -> dict[str, Any]:
    d = Path(engines_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise SedeployError(f"'{d}' has no {MANIFEST}.", expected="a folder written by `sedeploy build-engine`",
                            fix=f"run `sedeploy build-engine MODEL -o {d}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SedeployError(f"'{path}' is not valid JSON ({err}).", fix="rebuild the folder with build-engine") from err
    if not isinstance(data, dict) or not isinstance(data.get("engines", []), list):
        raise SedeployError(f"'{path}' is not a build-engine manifest.", fix="rebuild the folder with build-engine")
    return data


def _locate(recorded: str | None, engines_dir: Path) -> Path | None:
    """A manifest path as recorded (absolute at build time), else the same file name in ``engines_dir`` (the
    folder was moved)."""
    if not recorded:
        return None
    p = Path(recorded)
    if not p.is_absolute():
        p = engines_dir / p
    if p.exists():
        return p
    moved = engines_dir / Path(recorded).name
    return moved if moved.exists() else None


def manifest_engines(engines_dir: str | Path, *, artifacts: bool = False) -> list[dict[str, Any]]:
    """The manifest's engines (each with resolved ``path``/``sidecar``), or its portable ONNX artifacts as ONNX
    Runtime models when ``artifacts`` is asked or it built no engines (``--backend none``)."""
    d = Path(engines_dir)
    data = read_manifest(d)
    entries = [] if artifacts else [dict(e) for e in data.get("engines") or []]
    if not entries:
        entries = [{"path": a.get("path"), "sidecar": None, "backend": "ort", "precision": a.get("precision"),
                    "kind": a.get("kind"), "flavour": a.get("flavour"), "from": a.get("path")}
                   for a in data.get("artifacts") or []]
    out = []
    for e in entries:
        path = _locate(e.get("path"), d)
        if path is None:
            raise SedeployError(f"The manifest of '{d}' lists '{e.get('path')}', which is missing.",
                                fix="rebuild the folder with `sedeploy build-engine`")
        e["path"], e["sidecar"] = path, _locate(e.get("sidecar"), d)
        e["from"] = _locate(e.get("from"), d)
        out.append(e)
    if not out:
        raise SedeployError(f"The manifest of '{d}' lists no engines and no artifacts.",
                            fix="rebuild the folder with `sedeploy build-engine`")
    return out


def _onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from sedeploy.onnxcore import load_onnx

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
    from sedeploy.backends import read_sidecar

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
    """The engine's preprocessing as sedeploy's bench reads it (model metadata, else mmcls's pipeline at the input
    size); recorded in config.pbtxt so a client needs nothing but the server. None for a non-image input."""
    from sedeploy.bench.engines import describe_engine, preprocess_for
    from sedeploy.preprocess import Preprocess

    try:
        return preprocess_for(describe_engine(path))
    except SedeployError as err:
        shape = inputs[0].shape if inputs else []
        if len(shape) == 4 and shape[2] > 0:
            log.info("Preprocessing of %s from its input size (%s).", path.name, err.what)
            return Preprocess.for_size(int(shape[2]))
        return None


# ------------------------------------------------------------------------------------------- batching policy
def _bench_entry(results: dict[str, Any], engine: Path) -> dict[str, Any] | None:
    for e in results.get("engines") or []:
        p = (e.get("info") or {}).get("path")
        if (p and Path(p).name == engine.name) or e.get("name") == engine.name:
            return e
    return None


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``sedeploy bench`` results.json (its per-engine, per-batch timings choose the batching settings)."""
    rp = Path(path)
    if not rp.is_file():
        raise SedeployError(f"The bench results '{rp}' do not exist.",
                            fix="pass the results.json written by `sedeploy bench ENGINES --out DIR`")
    try:
        data = json.loads(rp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SedeployError(f"'{rp}' is not valid JSON ({err}).", fix="pass a bench results.json") from err
    if not isinstance(data, dict) or not isinstance(data.get("engines"), list):
        raise SedeployError(f"'{rp}' is not a bench results file (no 'engines' list).",
                            fix="pass the results.json written by `sedeploy bench ENGINES --out DIR`")
    return data


def batching_policy(engine: Path, max_batch: int, opt_batch: int | None,
                    results: dict[str, Any] | None) -> tuple[list[int], int, str]:
    """(preferred batch sizes, max queue delay in µs, which rule chose them) — see the module docstring."""
    bench = _bench_entry(results, engine) if results else None
    if bench:
        stats = {int(b): s for b, s in (bench.get("batch") or {}).items()
                 if str(b).isdigit() and isinstance(s, dict) and s.get("throughput")}
        fits = {b: s for b, s in stats.items() if b <= max_batch}
        if fits:
            best = max(s["throughput"] for s in fits.values())
            preferred = sorted(b for b, s in fits.items() if s["throughput"] >= NEAR_BEST * best)
            one = stats.get(1, {}).get("latency_ms", {}).get("p50")
            delay = (int(min(max(one * 1000 / 2, DELAY_BOUNDS_US[0]), DELAY_BOUNDS_US[1])) if one
                     else DEFAULT_QUEUE_DELAY_US)
            rule = (f"bench results: batch sizes within {NEAR_BEST:.0%} of the best throughput "
                    f"({best:.1f} img/s) among {sorted(fits)}; queue delay = half the batch-1 median latency "
                    f"({one} ms), clamped to {DELAY_BOUNDS_US[0]}..{DELAY_BOUNDS_US[1]} us" if one else
                    f"bench results (no batch-1 timing: default {DEFAULT_QUEUE_DELAY_US} us delay)")
            return preferred, delay, rule
    pref = opt_batch if opt_batch and opt_batch <= max_batch else min(8, max_batch)
    src = "the TensorRT profile's opt batch" if opt_batch else f"min(8, max_batch_size={max_batch})"
    return [pref], DEFAULT_QUEUE_DELAY_US, f"default (no bench results for this engine): {src}, " \
                                           f"{DEFAULT_QUEUE_DELAY_US} us delay"


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
            from sedeploy.backends.ort import unsupported_here
            from sedeploy.onnxcore import holds_fp16_tensors

            if unsupported_here("fp16") is not None and holds_fp16_tensors(e["path"]):
                log.warning("%s holds FP16 tensors; Triton's ONNX Runtime backend on the CPU computes them in FP32 "
                            "here (no FP16 kernels on this CPU): served, but not at FP16 speed or rounding.",
                            e["path"].name)
        classes = outputs[0].shape[-1] if outputs and outputs[0].shape else -1
        if labels and len(labels) != classes:
            raise SedeployError(f"The labels file has {len(labels)} names, '{e['path'].name}' has {classes} classes.",
                                fix="pass the class-name table of this model (one name per class, in index order)")
        models.append(TritonModel(model_name(e["path"], e["backend"]), e["path"], e["backend"], e.get("sidecar"), e,
                                  inputs, outputs, mb, preferred, delay, rule, instances, params, list(labels or [])))
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
    from sedeploy.backends import read_sidecar

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
    from sedeploy.fsutil import folder_lock, missing_dirs, remove_empty_dirs
    from sedeploy.serving.env import require_client

    require_client("sedeploy package --triton (it validates every config.pbtxt with Triton's ModelConfig)")
    out = Path(out_dir)
    check_output_folder(engines_dir, out, force=force)
    bench = read_results(results) if results is not None else None
    labels = None
    if labels_file is not None:
        from sedeploy.bench.labels import read_class_names

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
