"""File names of a build: artifact kinds and their suffixes, engine and sidecar suffixes, the manifest's name.

The one place that knows how sedeploy names what it writes. It sits below :mod:`sedeploy.onnxcore` and imports
nothing of sedeploy's but :mod:`sedeploy.errors`, so every layer (ONNX loading, backends, the build, bench,
serving) can ask it without an import cycle::

    <stem>.<kind>.onnx                 a portable artifact        (kind: fp32, fp16, int8-trt, int8-cpu, int8-ov)
    <stem>.<kind>.ort-opt.onnx         an ONNX Runtime engine  +  <stem>.<kind>.ort.json   (its sidecar)
    <stem>.<kind>.plan                 a TensorRT engine       +  <stem>.<kind>.trt.json
    <stem>.<kind>.ov.xml / .ov.bin     an OpenVINO engine      +  <stem>.<kind>.ov.json
    manifest.json                      what one build wrote (read by bench, package, serve and the next build)
"""
from __future__ import annotations

from pathlib import Path

from sedeploy.errors import SedeployError

#: the file a build-engine output folder lists its artifacts and engines in (read by bench, package, peers)
MANIFEST = "manifest.json"
#: artifact kinds: the precision plus, for INT8, the flavour (the backend family the Q/DQ form is made for)
KINDS = ("fp32", "fp16", "int8-trt", "int8-cpu", "int8-ov")
INT8_FLAVOURS = ("trt", "cpu", "ov")

#: per backend (the ``--backend`` name): the ending of its engine files and of their JSON sidecars
ENGINE_SUFFIX = {"ort": ".ort-opt.onnx", "trt": ".plan", "openvino": ".ov.xml"}
SIDECAR_SUFFIX = {"ort": ".ort.json", "trt": ".trt.json", "openvino": ".ov.json"}
#: an OpenVINO engine's weights, written beside its ``.ov.xml``
OPENVINO_WEIGHTS_SUFFIX = ".ov.bin"

#: files a build writes that are not ONNX models, and what each is (named when one is given as a model)
NOT_A_MODEL = ((ENGINE_SUFFIX["openvino"], "an OpenVINO engine (IR)"),
               (OPENVINO_WEIGHTS_SUFFIX, "an OpenVINO engine's weights file"),
               (ENGINE_SUFFIX["trt"], "a TensorRT engine"),
               *((suffix, "an engine's sidecar") for suffix in SIDECAR_SUFFIX.values()))

# what artifact_stem strips: the kinds and the engines' own markers
_NAME_MARKERS = tuple(f".{k}" for k in KINDS) + (".ort-opt", ".ov")


def artifact_path(out_dir: str | Path, stem: str, kind: str) -> Path:
    """``<out_dir>/<stem>.<kind>.onnx``."""
    if kind not in KINDS:
        raise SedeployError(f"Unknown artifact kind {kind!r}.", expected=f"one of {', '.join(KINDS)}")
    return Path(out_dir) / f"{stem}.{kind}.onnx"


def artifact_stem(path: str | Path) -> str:
    """``se-resnet50.int8-cpu.onnx`` → ``se-resnet50``: artifacts of artifacts keep the model's name."""
    stem = Path(path).name
    for ext in (".onnx", ".plan", ".xml", ".blob"):
        stem = stem.removesuffix(ext)
    for marker in _NAME_MARKERS:
        stem = stem.removesuffix(marker)
    return stem


def engine_paths(out_dir: str | Path, source: str | Path, backend: str) -> tuple[Path, Path]:
    """(engine file, sidecar) that ``backend`` writes in ``out_dir`` for the ONNX file ``source``
    (``x.fp32.onnx`` → ``x.fp32.plan`` + ``x.fp32.trt.json``)."""
    stem = Path(source).name.removesuffix(".onnx")
    out = Path(out_dir)
    return out / f"{stem}{ENGINE_SUFFIX[backend]}", out / f"{stem}{SIDECAR_SUFFIX[backend]}"


def engine_stem(engine: str | Path) -> str:
    """An engine or artifact file name without its engine ending (``x.fp32.ov.xml`` → ``x.fp32``,
    ``x.fp32.onnx`` → ``x.fp32``)."""
    name = Path(engine).name
    for suffix in (*ENGINE_SUFFIX.values(), ".onnx"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
