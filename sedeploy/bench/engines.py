"""What the benchmark runs: engine files described from their metadata, opened as runners, checked to be one model.

An engine is an ONNX artifact (``build-engine``'s FP32 / FP16 / INT8 files, or ORT's ``.ort-opt.onnx``) run by
ONNX Runtime, or a TensorRT ``.plan`` with its ``.trt.json`` sidecar. Everything the report needs (precision,
flavour, model, FLOPs, input size, batch limits) is read *before* anything runs, from the ONNX ``metadata_props``
sedeploy writes (read without the weights) or from the sidecar, so that a mixed-up set of files is refused in
seconds rather than after a long timing run.

Why the "same model" check matters: comparing an INT8 SE-ResNet-101 with an FP32 SE-ResNet-50 gives a drift figure
that looks like a quantisation disaster and is nothing of the kind. Engines are compared field by field with the
reference (model name, depth, SE, classes, weights, parameter count, input size) and every difference is named.

Which engines may run together (one reference, one model, batch sizes and label offset they all accept) is
:mod:`sedeploy.bench.selection`. The rows timed beside the engines (PyTorch eager, the same depth without SE) are made in
:mod:`sedeploy.bench.baselines` from the same metadata.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sedeploy.backends import BACKENDS, Runner, backend_for_engine, open_runner as backend_runner, read_sidecar, \
    sidecar_path
from sedeploy.bench.report import EngineInfo
from sedeploy.errors import SedeployError
from sedeploy.layout import Manifest
from sedeploy.onnxcore import META, check_input_memory, get_metadata, graph_precision, image_input, load_onnx, \
    sha256_file
from sedeploy.preprocess import Preprocess, recorded_preprocess

log = logging.getLogger("sedeploy")

__all__ = ["EngineSpec", "FIXED_BATCH_BACKENDS", "IDENTITY_FIELDS", "expand_engine_paths", "describe_engine",
           "start_runner", "engine_info", "model_flops", "preprocess_for", "stem_width"]

#: metadata fields that must agree between engines of one benchmark (sedeploy export writes them)
IDENTITY_FIELDS = (META.MODEL, META.DEPTH, META.SE, META.NUM_CLASSES, META.WEIGHTS,
                   META.PARAMS, META.BLOCK_STYLE)
#: backends whose engines keep the ONNX graph's batch dimension: fixed there → that one batch only (TensorRT
#: engines instead accept any batch up to their optimization profile's max)
FIXED_BATCH_BACKENDS = ("ort", "openvino")


@dataclass
class EngineSpec:
    """One engine file, described without running it."""

    name: str
    path: Path
    backend: str  # a key of sedeploy.backends.BACKENDS
    precision: str  # fp32 | fp16 | int8
    flavour: str  # "trt" / "cpu" for INT8 artifacts, "ort-opt" for ORT's saved graph, "" otherwise
    meta: dict[str, Any] = field(default_factory=dict)  # sedeploy.* metadata (of the source ONNX for plans)
    input_shape: tuple = ()  # (N, C, H, W) whatever the layout; N an int for a static batch, None when dynamic
    num_classes: int | None = None
    max_batch: int | None = None  # static batch or TensorRT profile max; None = unlimited
    sidecar: dict[str, Any] | None = None
    layout: str = "NCHW"  # the engine's input layout: what bench and serving feed it (sedeploy.preprocess.layout_batch)

    @property
    def static_batch(self) -> int | None:
        """The one batch size a graph with a fixed batch dimension accepts (None: any)."""
        if self.backend in FIXED_BATCH_BACKENDS:
            return self.max_batch
        return None

    @property
    def input_size(self) -> int | None:
        return self.input_shape[2] if len(self.input_shape) == 4 else None

    @property
    def input_hw(self) -> tuple[int, int] | None:
        return (self.input_shape[2], self.input_shape[3]) if len(self.input_shape) == 4 else None


def expand_engine_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a folder stands for the engines its manifest (written by ``build-engine``) lists, or, when
    it built no engines (``--backend none``), its artifacts (:meth:`sedeploy.layout.Manifest.locate_entry` finds
    each, its sidecar and companion files too)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            manifest = Manifest.read(p, alternative="the engine files (.onnx, .plan) themselves")
            entries = manifest.engines or manifest.artifacts
            if not entries:
                raise SedeployError(f"'{manifest.path}' lists no engines or artifacts.",
                                    fix="pass the engine files themselves")
            out.extend(manifest.locate_entry(e) for e in entries)
        else:
            out.append(p)
    if not out:
        raise SedeployError("No engines to benchmark.",
                            expected="one or more engine files (.onnx, .plan) or a `build-engine` output folder",
                            fix="e.g. sedeploy bench out/model.fp32.onnx out/model.int8-cpu.onnx")
    return out


def load_light(path: Path):
    """The ONNX graph without external weight files (only names, types, shapes and metadata are needed)."""
    return load_onnx(path, weights=False, check=False)


def _ort_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar of an ORT engine (``.ort-opt.onnx``; None for a plain .onnx artifact, whose name maps to the
    sidecar of the engine built from it); an engine file that is not the one its sidecar describes (the recorded
    sha256 differs: a file swapped in from another build) is refused."""
    side = sidecar_path(path)
    if not any(path.name.endswith(s) for s in BACKENDS["ort"].engine_suffixes) or not side.is_file():
        return None
    data = read_sidecar(side, engine=path)
    want = data.get("engine_sha256")
    st = path.stat()
    if want is not None and _sha256(str(path), st.st_mtime_ns, st.st_size) != want:
        raise SedeployError(f"The engine '{path}' is not the file its sidecar '{side.name}' describes (sha256 "
                            "differs from the one recorded at build time).",
                            fix="benchmark the build folder as build-engine wrote it, or rebuild the engine into "
                                "a new folder (sedeploy build-engine MODEL --backend ort -o NEW_FOLDER)")
    return data


def describe_engine(path: str | Path) -> EngineSpec:
    """Read an engine's description (precision, flavour, model metadata, input shape, batch limit)."""
    path = Path(path)
    if not path.exists():
        raise SedeployError(f"The engine '{path}' does not exist.", fix="check the path")
    if path.is_dir():
        raise SedeployError(f"The engine '{path}' is a folder.", fix="pass the engine file")
    backend = backend_for_engine(path)
    if backend.name != "ort":
        return _describe_compiled(path, backend.name)
    proto = load_light(path)
    inp = image_input(proto, path=str(path))
    check_input_memory(inp, path=str(path))  # a declared 3×40000×40000 input is refused before any allocation
    meta = get_metadata(proto)
    sidecar = _ort_sidecar(path)
    precision = str(meta.get(META.PRECISION) or graph_precision(proto)).lower()
    flavour = str(meta.get(META.FLAVOUR) or ("ort-opt" if path.name.endswith(".ort-opt.onnx") else ""))
    dims = proto.graph.output[0].type.tensor_type.shape.dim if proto.graph.output else []
    classes = dims[1].dim_value if len(dims) == 2 and dims[1].dim_value > 0 else meta.get(META.NUM_CLASSES)
    batch = None if inp.dynamic_batch else int(inp.batch)
    return EngineSpec(name=path.name.removesuffix(".onnx"), path=path, backend="ort", precision=precision,
                      flavour=flavour, meta=meta, input_shape=(batch, inp.channels, inp.height, inp.width),
                      num_classes=int(classes) if classes else None, max_batch=batch, sidecar=sidecar,
                      layout=inp.layout)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def source_onnx(path: Path, sidecar: dict[str, Any] | None) -> Path | None:
    """The ONNX file an engine computes: the engine itself when it is an ONNX file, else the source its sidecar
    recorded. For the source, the file of that name *beside the engine* comes first (a copied or moved build
    folder must not read the original folder's model), then the recorded path; it must have the sha256 recorded
    at build time. None when neither exists (a build moved without its ONNX); a differing file is an error. The
    one place every reader of an engine's source (metadata, FLOPs, stem width, the peers) finds it."""
    path = Path(path)
    if path.suffix == ".onnx":
        return path
    side = sidecar or {}
    recorded = Path(side.get("source_model") or "")
    found = [p for p in dict.fromkeys((path.parent / recorded.name, recorded)) if p.suffix == ".onnx" and p.is_file()]
    want = side.get("source_sha256")

    def same(p: Path) -> bool:
        st = p.stat()
        return want is None or _sha256(str(p), st.st_mtime_ns, st.st_size) == want

    matching = [p for p in found if same(p)]
    if found and not matching:
        raise SedeployError(f"The ONNX model '{path.name}' was built from is not the one beside it or where its "
                            f"sidecar points: {', '.join(map(str, found))} differ(s) from the sha256 the sidecar "
                            "recorded.", fix="benchmark the build folder as build-engine wrote it, or rebuild the "
                                             "engine from the ONNX file you have (sedeploy build-engine MODEL "
                                             "-o NEW_FOLDER)")
    return matching[0] if matching else None


def stem_width(spec: "EngineSpec") -> int | None:
    """The stem width (output channels of the first conv) of the network behind ``spec``, read from its source
    ONNX; None when that file is not there or has no such conv."""
    src = source_onnx(spec.path, spec.sidecar)
    return base_channels(load_light(src)) if src is not None else None


def _describe_compiled(path: Path, backend: str) -> EngineSpec:
    """A compiled engine (TensorRT plan, OpenVINO model) described from its sidecar and its source ONNX."""
    side = read_sidecar(sidecar_path(path), engine=path)
    src = source_onnx(path, side)
    meta: dict[str, Any] = get_metadata(load_light(src)) if src is not None else {}
    prof = side.get("profile") or {}

    def dims(key: str) -> list[int] | None:
        v = prof.get(key) if isinstance(prof, dict) else None
        ok = isinstance(v, list) and len(v) == 4 and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
        return v if ok else None

    hi = dims("max")
    layout = "NCHW"
    if src is not None and hi is not None:  # the engine takes its source's layout (NHWC: the profile is N×H×W×C)
        layout = image_input(load_light(src), path=str(src)).layout
        if layout == "NHWC":
            hi = [hi[0], hi[3], hi[1], hi[2]]
    if hi is None:
        raise SedeployError(f"The sidecar of '{path}' has no 4-D input profile (profile = {prof!r}).",
                            expected='"profile": {"max": [N, C, H, W], …} with whole numbers (−1: dynamic)',
                            fix=f"rebuild the engine into a new folder with `sedeploy build-engine MODEL --backend "
                                f"{backend} -o NEW_FOLDER`")
    precision = side.get("precision", "fp32")
    if precision not in ("fp32", "fp16", "int8"):
        raise SedeployError(f"The sidecar of '{path}' names an unknown precision {precision!r}.",
                            expected="fp32, fp16 or int8",
                            fix=f"rebuild the engine into a new folder with `sedeploy build-engine MODEL --backend "
                                f"{backend} -o NEW_FOLDER`")
    # a batch of −1 (OpenVINO, dynamic batch) has no upper limit; a fixed one is the only batch the engine takes
    top = hi[0]
    lo = dims("min") or hi
    fixed = backend in FIXED_BATCH_BACKENDS and top > 0 and lo[0] == top
    return EngineSpec(name=path.name, path=path, backend=backend, precision=precision,
                      flavour=str(meta.get(META.FLAVOUR) or ""), meta=meta,
                      input_shape=(top if fixed else None, *map(int, hi[1:])),
                      num_classes=meta.get(META.NUM_CLASSES), max_batch=top if top > 0 else None,
                      sidecar=side, layout=layout)


def start_runner(spec: EngineSpec, *, threads: int | None, providers=None, optimization: str = "all") -> Runner:
    """An active runner for the engine. A plan needs TensorRT and a GPU; without them this raises, naming the
    engine (no engine is dropped from a benchmark behind the user's back)."""
    try:
        return backend_runner(spec.path, threads=threads, providers=providers, optimization=optimization).activate()
    except SedeployError as err:
        leave_out = "leave this engine out of the benchmark"
        wrapped = SedeployError(f"Cannot run the {BACKENDS[spec.backend].label} engine '{spec.name}': {err.what}",
                                expected=err.expected, fix=f"{err.fix}; or {leave_out}" if err.fix else leave_out)
        wrapped.exit_code = err.exit_code  # a missing extra stays exit 4, a bad engine file 2
        raise wrapped from err


def engine_info(spec: EngineSpec, flops: dict[str, Any], runner, device: str) -> EngineInfo:
    """The report's description of an engine: its metadata (less the preprocessing), FLOPs and runner."""
    meta = spec.meta
    info = {"path": str(spec.path), "flops_source": flops["flops_source"],
            "input_shape": list(spec.input_shape), "metadata": {k: v for k, v in meta.items()
                                                               if k != META.PREPROCESS}}
    describe = getattr(runner, "describe", None)
    if callable(describe):
        info["runner"] = describe()
    return EngineInfo(name=spec.name, model=str(meta.get(META.MODEL) or spec.path.name.split(".")[0]),
                      precision=spec.precision, gflops_total=_nan(flops["gflops_total"]),
                      depth=meta.get(META.DEPTH), flavour=spec.flavour, backend=spec.backend, device=device,
                      gflops_seed=flops["gflops_seed"], info=info)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def preprocess_for(spec: EngineSpec) -> Preprocess:
    """The preprocessing stored in the model's metadata, else mmcls's pipeline at the engine's input size
    (:func:`sedeploy.preprocess.recorded_preprocess`)."""
    return recorded_preprocess(spec.meta.get(META.PREPROCESS), spec.input_hw or (224, 224), name=spec.name)


# --------------------------------------------------------------------------------------------------- FLOPs
def base_channels(proto) -> int | None:
    """Width of the stem: output channels of the conv that reads the image input."""
    inits = {t.name: t for t in proto.graph.initializer}
    data = {i.name for i in proto.graph.input} - set(inits)
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input and node.input[0] in data and node.input[1] in inits:
            return int(inits[node.input[1]].dims[0])
    return None


def _graph_macs(proto) -> int | None:
    """Multiply-adds per image of Conv and Gemm/MatMul nodes (> 99 % of a ResNet's work), from shape inference.
    Used only for graphs without sedeploy metadata."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:
        log.warning("Shape inference failed (%s); no FLOPs for this graph.", err)
        return None
    shapes = {}
    for vi in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type == "Conv":
            out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
            if not out or not w or any(d is None for d in out[1:]) or any(d is None for d in w):
                return None
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            w = shapes.get(node.input[1])
            if not w or len(w) != 2 or any(d is None for d in w):
                return None
            total += int(w[0]) * int(w[1])
    return total


def model_flops(spec: EngineSpec) -> dict[str, Any]:
    """The model's FLOPs per image: ``gflops_seed`` (model-zoo convention, multiply-adds) and ``gflops_total``
    (2 × all multiply-adds), with where they came from. Metadata first, then :mod:`sedeploy.flops` on the rebuilt
    network, then a count of the graph's Conv/Gemm nodes."""
    meta = spec.meta
    if meta.get(META.TOTAL_MACS) is not None:
        seed = meta.get(META.FLOPS)
        return {"gflops_seed": seed / 1e9 if seed is not None else None,
                "gflops_total": 2 * meta[META.TOTAL_MACS] / 1e9, "flops_source": "ONNX metadata"}
    src = source_onnx(spec.path, spec.sidecar)
    proto = load_light(src) if src is not None else None
    depth = meta.get(META.DEPTH)
    width = base_channels(proto) if proto is not None else None
    if depth is not None and spec.input_size and width is not None:
        from sedeploy.flops import count_complexity
        from sedeploy.model import build_model

        net = build_model(int(depth), se=bool(meta.get(META.SE, True)),
                          num_classes=int(spec.num_classes or 1000), base_channels=width, seed=None)
        cx = count_complexity(net, spec.input_size)
        return {"gflops_seed": cx.seed_macs / 1e9, "gflops_total": cx.total_gflops,
                "flops_source": "sedeploy.flops on the rebuilt network"}
    if proto is not None and spec.precision == "fp32":
        macs = _graph_macs(proto)
        if macs:
            return {"gflops_seed": None, "gflops_total": 2 * macs / 1e9,
                    "flops_source": "Conv + Gemm/MatMul nodes of the FP32 graph (no sedeploy metadata)"}
    return {"gflops_seed": None, "gflops_total": None, "flops_source": "unknown (no metadata, no FP32 graph)"}
