"""What the TensorRT backend needs besides building and running: the strongly typed network flag, the timing
cache (keyed, locked, merged with its result checked), per-layer precision from the engine inspector, and the
CUDA version TensorRT itself was built for.

Everything takes the ``tensorrt`` module (or objects made by it) as an argument: nothing here imports it, so
these functions run against the test stand-in (tests/fake_tensorrt.py) exactly as against the real bindings.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_write_bytes

log = logging.getLogger("sedeploy")

#: First TensorRT major version in which every network is strongly typed (the flag is deprecated and ignored).
STRONGLY_TYPED_MAJOR = 11
#: Narrowest first: a layer that reads int8 and writes float16 computes in int8.
_PRECISION_ORDER = ("int4", "fp4", "fp8", "int8", "uint8", "fp16", "bf16", "fp32", "int32", "int64", "bool")
#: Words (whole tokens, case-insensitive) naming a data type in the inspector's JSON: the 10.x "Format/Datatype"
#: text ("Channel major FP16 format where channel % 8 == 0", "Thirty-two wide channel vectorized row major Int8
#: format", "Row major linear FP32") and the 11.x "Datatype" value ("Float", "Half", "Int8", "BFloat16" ...).
_TYPE_WORDS = {"fp32": "fp32", "float": "fp32", "float32": "fp32", "fp16": "fp16", "half": "fp16",
               "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8", "uint8": "uint8",
               "fp8": "fp8", "float8": "fp8", "int4": "int4", "fp4": "fp4", "int32": "int32", "int64": "int64",
               "bool": "bool", "boolean": "bool"}


# ------------------------------------------------------------------------------------------------ strong typing
def strongly_typed_flags(trt, version: tuple[int, int, int]) -> int:
    """``create_network`` flags. 10.x: ``1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` from *this*
    module's enum, never a hard-coded integer (11 renumbered the enums); a 10.x without the flag cannot build
    sedeploy's precision-by-construction artifacts and is refused. 11.x and later: 0 — every network is strongly
    typed and the flag is deprecated ("retained for API compatibility but ignored"), so none is passed."""
    if version[0] >= STRONGLY_TYPED_MAJOR:
        return 0
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    raise SedeployError(f"TensorRT {'.'.join(map(str, version))} has no NetworkDefinitionCreationFlag."
                        "STRONGLY_TYPED: it would choose layer precisions itself (weak typing).",
                        expected="TensorRT 10.x or 11.x (pip install 'sedeploy[tensorrt]')",
                        fix="upgrade TensorRT")


# ------------------------------------------------------------------------------------------------ timing cache
def timing_cache_path(base: str | Path, tensorrt_version: str, compute_capability: str) -> Path:
    """The cache file for this TensorRT version and GPU architecture: ``tc.bin`` → ``tc.trt10.13.0.35.sm90.bin``.
    Timing entries are only valid for one TensorRT and one architecture, and ``combine`` drops mismatching ones,
    so each pair gets its own file."""
    base = Path(base)
    version = ".".join(re.findall(r"\d+", str(tensorrt_version)))
    key = f"trt{version}.sm{str(compute_capability).replace('.', '')}"
    return base.with_name(f"{base.stem}.{key}{base.suffix}")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (``fcntl.flock`` on ``<path>.lock``) around a read-merge-write of ``path``,
    as Polygraphy does for shared timing caches: two builds sharing one cache file do not lose each other's
    entries."""
    try:
        import fcntl
    except ImportError as err:  # Windows: no fcntl
        raise SedeployError("A shared TensorRT timing cache needs fcntl file locks (POSIX).",
                            fix="build without --timing-cache on this platform") from err
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_timing_cache(config, path: Path) -> int:
    """Attach the timing cache at ``path`` (empty if absent); return how many of its bytes were accepted."""
    with file_lock(path):
        data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return len(data)
    log.warning("The timing cache '%s' (%d bytes) does not match this TensorRT / GPU; starting an empty one.",
                path, len(data))
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise SedeployError("TensorRT refused even an empty timing cache.", fix="build without --timing-cache")
    return 0


def save_timing_cache(config, path: Path) -> dict[str, Any]:
    """Merge what the build learnt with the file as it is now (another build may have grown it), then replace the
    file atomically — all under :func:`file_lock`. ``combine`` returns False when the file was made by another
    TensorRT or GPU (its entries are then skipped): that is logged and reported, and this build's cache replaces
    the file. Returns ``{"path", "merged": bool | None, "bytes"}`` (merged None: there was no file to merge)."""
    cache = config.get_timing_cache()
    merged = None
    with file_lock(path):
        if path.is_file():
            on_disk = config.create_timing_cache(path.read_bytes())
            merged = bool(on_disk is not None and cache.combine(on_disk, False))
            if not merged:
                log.warning("TensorRT could not merge the timing cache '%s' (combine returned False: made by another "
                            "TensorRT version or GPU); its entries are dropped and the file is replaced.", path)
        data = bytes(memoryview(cache.serialize()))
        atomic_write_bytes(path, data)
    return {"path": str(path), "merged": merged, "bytes": len(data)}


# ----------------------------------------------------------------------------------------- layer precisions
#: The keys under which a layer's input/output tensors carry their data type. TensorRT 10.x writes one text
#: "Format/Datatype" ("Channel major FP16 format where channel % 8 == 0", "Row major linear FP32"); 11.x split it
#: into "Format" (layout) and "Datatype" ("Float", "Half", "Int8"; the engine-level "I/O Tensors" spell it
#: "DataType"), as NVIDIA's 11.x inspector tooling reads it. Keys are matched case-insensitively.
_SPLIT_TYPE_KEY = "datatype"
_COMBINED_KEY = "format/datatype"
LAYOUT_10 = "Format/Datatype (TensorRT 10.x)"
LAYOUT_11 = "Format + Datatype (TensorRT 11.x)"


def _type_of_text(text: Any) -> str | None:
    """The one data type a format/datatype text names, or None (no type word, or several different ones)."""
    if not isinstance(text, str):
        return None
    found = {_TYPE_WORDS[w] for w in re.findall(r"[a-z0-9]+", text.lower()) if w in _TYPE_WORDS}
    return found.pop() if len(found) == 1 else None


def _tensor_type(tensor: Any) -> tuple[str | None, str | None, str]:
    """(precision or None, layout, why-not) of one inspector tensor entry."""
    if not isinstance(tensor, dict):
        return None, None, f"tensor entry {tensor!r} is not an object"
    keys = {str(k).lower(): k for k in tensor}
    if _SPLIT_TYPE_KEY in keys:
        value = tensor[keys[_SPLIT_TYPE_KEY]]
        got = _type_of_text(value)
        return got, LAYOUT_11, "" if got else f"Datatype {value!r} names no single known type"
    if _COMBINED_KEY in keys:
        value = tensor[keys[_COMBINED_KEY]]
        got = _type_of_text(value)
        return got, LAYOUT_10, "" if got else f"Format/Datatype {value!r} names no single known type"
    return None, None, (f"tensor {tensor.get('Name', '?')!r} has neither 'Datatype' (11.x) nor 'Format/Datatype' "
                        f"(10.x); keys: {sorted(tensor)}")


def layer_precisions(engine_information: str) -> dict[str, Any]:
    """Per-layer precision from ``engine.create_engine_inspector().get_engine_information(
    trt.LayerInformationFormat.JSON)`` of an engine built with ``profiling_verbosity = DETAILED`` and inspected
    through an execution context whose input shapes are set (without one, TensorRT shows no format information).

    Each layer's "Inputs"/"Outputs" tensors carry their type: TensorRT 10.x in one "Format/Datatype" text, 11.x in
    a separate "Datatype" field (both read, see :data:`LAYOUT_10` / :data:`LAYOUT_11`). A layer computes in the
    narrowest type it reads or writes (an int8 convolution with a fused float16 output computes in int8).

    Returns ``{"layers": [{"name", "type", "precision", "inputs", "outputs"}], "counts": {precision: layers},
    "unreadable": [{"name", "reason"}], "layout": ...}``. A layer whose type cannot be read (a bare name, as with
    a verbosity below DETAILED; a tensor without a type field; a type text naming no known type) has precision
    "unknown" and is listed in "unreadable" with the reason: callers must treat any entry there as a failure to
    verify precision, never as a pass. A layer with no input or output tensors at all (e.g. a shape-only call)
    has precision "none"."""
    try:
        info = json.loads(engine_information)
    except (json.JSONDecodeError, TypeError) as err:
        raise SedeployError(f"TensorRT's engine inspector returned no JSON ({err}).",
                            fix="report this with the TensorRT version") from err
    raw = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(raw, list):
        keys = sorted(info) if isinstance(info, dict) else "-"
        raise SedeployError(f"TensorRT's engine inspector JSON has no 'Layers' list (top-level "
                            f"{type(info).__name__}, keys {keys}).", fix="report this with the TensorRT version")
    layers, unreadable, layouts = [], [], set()
    for layer in raw:
        if not isinstance(layer, dict):  # verbosity NONE/LAYER_NAMES_ONLY: layer names only
            layers.append({"name": str(layer), "type": None, "precision": "unknown", "inputs": [], "outputs": []})
            unreadable.append({"name": str(layer), "reason": "layer name only (profiling verbosity below DETAILED)"})
            continue
        name = layer.get("Name")
        per_key, reasons = {}, []
        for key in ("Inputs", "Outputs"):
            tensors = layer.get(key, [])
            if not isinstance(tensors, list):
                reasons.append(f"'{key}' is not a list")
                tensors = []
            per_key[key] = []
            for t in tensors:
                got, layout, why = _tensor_type(t)
                per_key[key].append(got)
                if layout:
                    layouts.add(layout)
                if not got:
                    reasons.append(f"{key[:-1].lower()} {why}")
        seen = [p for p in (*per_key["Inputs"], *per_key["Outputs"]) if p]
        if reasons:
            precision = "unknown"
            unreadable.append({"name": name, "reason": "; ".join(reasons)})
        elif not seen:
            precision = "none"
        else:
            precision = min(seen, key=_PRECISION_ORDER.index)
        layers.append({"name": name, "type": layer.get("LayerType"), "precision": precision,
                       "inputs": per_key["Inputs"], "outputs": per_key["Outputs"]})
    counts = Counter(layer["precision"] for layer in layers)
    layout = " and ".join(sorted(layouts)) if layouts else None
    return {"layers": layers, "counts": dict(counts.most_common()), "unreadable": unreadable, "layout": layout}


def precision_verdict(layer_info: dict[str, Any], graph_precision: str) -> list[str]:
    """Why the recorded layer precisions do not prove the engine's precision (empty: they do). Used by the GPU
    check: no layers, any unreadable layer, or no layer at all in the graph's own precision (an INT8 artifact
    whose engine has no int8 layer, an FP16 artifact without fp16 layers) is a failure — never a vacuous pass."""
    problems = []
    layers = layer_info.get("layers") or []
    counts = layer_info.get("counts") or {}
    unreadable = layer_info.get("unreadable")
    if not layers:
        problems.append("the engine inspector listed no layers")
    if unreadable is None:
        problems.append("no record of unreadable layers (sidecar written by an older sedeploy: rebuild)")
    elif unreadable:
        names = ", ".join(str(u.get("name")) for u in unreadable[:5])
        problems.append(f"{len(unreadable)} layer(s) with unreadable precision ({names}"
                        f"{', ...' if len(unreadable) > 5 else ''}): {unreadable[0].get('reason')}")
    expected = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}.get(graph_precision)
    if expected and layers and not counts.get(expected):
        problems.append(f"a {graph_precision} graph, but no layer runs in {expected} (counts: {counts})")
    return problems


# --------------------------------------------------------------------------------------------- CUDA version
def tensorrt_cuda_version(trt) -> dict[str, str | None]:
    """The CUDA version TensorRT itself was built for (not torch's): from the bindings when they report it
    (``trt.get_cuda_version()``, present in some releases), else from the installed wheel's name
    (``tensorrt-cu12`` / ``tensorrt-cu13`` and their ``-libs`` packages say the CUDA major they link)."""
    getter = getattr(trt, "get_cuda_version", None)
    if callable(getter):
        value = getter()
        if isinstance(value, int) and value > 1000:  # CUDA's encoding: 12080 → 12.8
            value = f"{value // 1000}.{(value % 1000) // 10}"
        return {"cuda": str(value), "source": "tensorrt.get_cuda_version()"}
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        match = re.fullmatch(r"tensorrt-cu(\d+)(?:-libs|-bindings)?", name)
        if match:
            return {"cuda": f"{match.group(1)}.x", "source": f"wheel {name} {dist.version}"}
    return {"cuda": None, "source": "unknown (no tensorrt-cuXX wheel installed, no binding reports it)"}
