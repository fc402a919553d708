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

#: First TensorRT major version in which every network is strongly typed (the flag is accepted and ignored).
STRONGLY_TYPED_MAJOR = 11
#: Narrowest first: a layer that reads int8 and writes float16 computes in int8.
_PRECISION_ORDER = ("int4", "fp4", "fp8", "int8", "fp16", "bf16", "fp32", "int32", "int64", "bool")
_FORMAT_WORDS = (("int8", ("int8",)), ("fp8", ("fp8",)), ("fp4", ("fp4",)), ("int4", ("int4",)),
                 ("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16", "half")), ("fp32", ("fp32", "float")),
                 ("int32", ("int32",)), ("int64", ("int64",)), ("bool", ("bool",)))


# ------------------------------------------------------------------------------------------------ strong typing
def strongly_typed_flags(trt, version: tuple[int, int, int]) -> int:
    """``create_network`` flags: ``1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` whenever the enum has
    it (10.x: makes the build follow the graph's types; 11.x: accepted and ignored, every network is strongly
    typed), never a hard-coded integer (11 renumbered the enums). A 10.x without the flag cannot build sedeploy's
    precision-by-construction artifacts: refused."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    if version[0] >= STRONGLY_TYPED_MAJOR:
        return 0
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
def _format_precision(text: str) -> str | None:
    low = str(text).lower()
    for name, words in _FORMAT_WORDS:
        if any(w in low for w in words):
            return name
    return None


def layer_precisions(engine_information: str) -> dict[str, Any]:
    """Per-layer precision from ``engine.create_engine_inspector().get_engine_information(
    trt.LayerInformationFormat.JSON)`` of an engine built with ``profiling_verbosity = DETAILED``.

    Each layer's inputs/outputs carry a "Format/Datatype" text ("Channel major FP16 format …", "Row major linear
    INT8 format", "Row major linear FP32"); a layer computes in the narrowest type it reads or writes (an int8
    convolution with a fused float16 output computes in int8). Returns ``{"layers": [{"name", "type",
    "precision", "inputs", "outputs"}], "counts": {precision: layers}}``; a layer with no recognisable format
    (e.g. with profiling verbosity below DETAILED) counts as "unknown"."""
    try:
        info = json.loads(engine_information)
    except (json.JSONDecodeError, TypeError) as err:
        raise SedeployError(f"TensorRT's engine inspector returned no JSON ({err}).",
                            fix="report this with the TensorRT version") from err
    layers = []
    for layer in info.get("Layers", []) if isinstance(info, dict) else []:
        if not isinstance(layer, dict):  # verbosity NONE/LAYER_NAMES_ONLY: layer names only
            layers.append({"name": str(layer), "type": None, "precision": "unknown", "inputs": [], "outputs": []})
            continue
        ins, outs = ([_format_precision(t.get("Format/Datatype", "")) for t in layer.get(key, []) if isinstance(t, dict)]
                     for key in ("Inputs", "Outputs"))
        seen = [p for p in (*ins, *outs) if p]
        precision = min(seen, key=_PRECISION_ORDER.index) if seen else "unknown"
        layers.append({"name": layer.get("Name"), "type": layer.get("LayerType"), "precision": precision,
                       "inputs": ins, "outputs": outs})
    counts = Counter(layer["precision"] for layer in layers)
    return {"layers": layers, "counts": dict(counts.most_common())}


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
