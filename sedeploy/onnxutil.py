"""Loading user-supplied ONNX files with clear errors, and reading what kind of image model they are."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from sedeploy.errors import SedeployError


@dataclass(frozen=True)
class ImageInput:
    """The single NCHW image input of a classifier."""

    name: str
    batch: int | str  # a fixed size or the symbolic name of a dynamic dimension
    channels: int
    height: int
    width: int

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.batch, int) or self.batch <= 0


def load_onnx(path: str | os.PathLike, *, what: str = "model"):
    """``onnx.load`` with one clear error for a missing, non-ONNX or truncated file."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.exists():
        raise SedeployError(f"The {what} '{p}' does not exist.",
                            fix="pass an .onnx file, e.g. one written by `sedeploy export`")
    if p.is_dir():
        raise SedeployError(f"The {what} '{p}' is a folder, not an ONNX file.", fix="pass the .onnx file itself")
    try:
        proto = onnx.load(str(p))
    except (DecodeError, ValueError, OSError, RuntimeError) as err:
        raise SedeployError(f"The {what} '{p}' is not a readable ONNX file ({type(err).__name__}: {err}); it may be "
                            "truncated or not ONNX at all.",
                            fix="re-export it (`sedeploy export`) or re-copy the file") from err
    if not proto.graph.node:
        raise SedeployError(f"The {what} '{p}' holds no ONNX graph (0 nodes); it is probably not an ONNX model "
                            "or was truncated.", fix="re-export it (`sedeploy export`) or re-copy the file")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SedeployError(f"The {what} '{p}' is not a valid ONNX model: {first}",
                            fix="re-export it (`sedeploy export`) or re-copy the file") from err
    return proto


def image_input(proto, *, path: str = "model") -> ImageInput:
    """The model's one 4-D NCHW float input, or a clear error saying what the model has instead."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise SedeployError(f"'{path}' has {len(inputs)} graph inputs ({names}).",
                            expected="an image classifier with exactly one N×C×H×W input",
                            fix="export the classifier with a single image input")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(dims) != 4:
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}.",
                            expected="a 4-D N×C×H×W image input",
                            fix="sedeploy handles image classifiers; export the model with an NCHW input")
    n, c, h, w = shape
    if not all(isinstance(v, int) and v > 0 for v in (c, h, w)):
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}: channels and spatial size must be fixed.",
                            expected="N×3×H×W with fixed C, H, W (the batch may be dynamic)",
                            fix="export with a fixed input size, e.g. `sedeploy export --input-size 224`")
    if c not in (1, 3):
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}: {c} channels in position 1.",
                            expected="NCHW layout with 3 (RGB) channels",
                            fix="convert an NHWC model to NCHW before using sedeploy")
    return ImageInput(inp.name, n, c, h, w)


def get_metadata(proto) -> dict[str, Any]:
    """A model's ``metadata_props`` as a dict, JSON values decoded (plain strings stay strings)."""
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def set_metadata(proto, values: dict[str, Any]) -> None:
    """Set (add or overwrite) ``metadata_props`` entries; non-string values are JSON-encoded."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            proto.metadata_props.add(key=key, value=text)
