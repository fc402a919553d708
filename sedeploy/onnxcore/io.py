"""Reading and writing ONNX files: one loader with clear errors, one atomic saver, metadata, hashes, the image input.

Every module that touches an ONNX file on disk goes through here, so a missing, truncated or non-ONNX file gets
the same clear message wherever it is met, and a written file is always checked and renamed into place whole.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_path, require_utf8_path
from sedeploy.layout import MANIFEST, NOT_A_MODEL


class META:
    """The ``metadata_props`` keys sedeploy writes into the ONNX files it produces (one constant per key)."""

    MODEL = "sedeploy.model"
    DEPTH = "sedeploy.depth"
    SE = "sedeploy.se"
    NUM_CLASSES = "sedeploy.num_classes"
    WEIGHTS = "sedeploy.weights"
    PARAMS = "sedeploy.params"
    BLOCK_STYLE = "sedeploy.block_style"
    PREPROCESS = "sedeploy.preprocess"
    VERSION = "sedeploy.version"  # the sedeploy version that wrote the file
    INPUT_SIZE = "sedeploy.input_size"
    FLOPS = "sedeploy.flops"  # model-zoo multiply-adds (mmcv convention)
    TOTAL_MACS = "sedeploy.total_macs"  # every multiply-add an engine executes
    PRECISION = "sedeploy.precision"
    #: the INT8 flavour ("trt" / "cpu"); the one key every reader and writer uses
    FLAVOUR = "sedeploy.int8_flavour"
    INT8_FORMAT = "sedeploy.int8_format"
    INT8_SE = "sedeploy.int8_se"
    FP16_KEEP_FP32 = "sedeploy.fp16_keep_fp32"
    SE_FUSED = "sedeploy.se_fused"
    SE_FORM = "sedeploy.se_form"
    CALIBRATION_METHOD = "sedeploy.calibration_method"
    CALIBRATION_KEY = "sedeploy.calibration_key"
    CALIBRATION_IMAGES = "sedeploy.calibration_images"
    #: the layout of the file's image input ("NCHW" / "NHWC"): what every consumer feeds it
    INPUT_LAYOUT = "sedeploy.input_layout"
    #: how the input was made NCHW and static (e.g. {"source_layout": "NHWC", "pinned": [48, 192]})
    INPUT_CHANGES = "sedeploy.input_changes"
    #: model output k + offset is dataset class k (1 for 1001-class models with a background class at 0), as
    #: ``build-engine --label-offset`` was told; bench, package and infer use it unless told otherwise
    LABEL_OFFSET = "sedeploy.label_offset"


@dataclass(frozen=True)
class ImageInput:
    """The single image input of a classifier: NCHW or NHWC (``layout``), described in NCHW terms.

    ``height``/``width`` are None only where :func:`image_input` was asked to accept dynamic H/W."""

    name: str
    batch: int | str  # a fixed size or the symbolic name of a dynamic dimension
    channels: int
    height: int | None
    width: int | None
    elem_type: int = 1  # TensorProto element type (1 = float32)
    layout: str = "NCHW"  # "NCHW" or "NHWC" (channels last, as TensorFlow converters write it)

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.batch, int) or self.batch <= 0

    @property
    def static_batch(self) -> int | None:
        """The one batch size a fixed-batch model accepts, None when the batch is dynamic."""
        return None if self.dynamic_batch else int(self.batch)

    @property
    def dynamic_hw(self) -> bool:
        return self.height is None or self.width is None

    @property
    def shape(self) -> list:
        """The declared shape, in the input's own layout (dynamic dimensions as "N", "H", "W")."""
        n = self.static_batch or "N"
        h, w = self.height or "H", self.width or "W"
        return [n, self.channels, h, w] if self.layout == "NCHW" else [n, h, w, self.channels]


def input_layout(shape: list, stated: str | None = None) -> str | None:
    """"NCHW" or "NHWC" from a 4-D input shape (ints for fixed dimensions, anything else for dynamic ones): the
    channel dimension is the fixed 1 or 3 on one side with the two spatial dimensions next to it. Where both
    readings fit (an input of 3×H×3), ``stated`` (the file's recorded layout) decides, else NCHW. None: neither."""
    if len(shape) != 4:
        return None

    def chan(v) -> bool:
        return isinstance(v, int) and v in (1, 3)

    first, last = chan(shape[1]), chan(shape[3])
    if first and last:
        return stated if stated in ("NCHW", "NHWC") else "NCHW"
    return "NCHW" if first else "NHWC" if last else None


#: a classifier's activations in its first layers reach several times its input (SE-ResNet-50: 5.3× after the
#: stem conv); the input of one batch times this must fit in the memory available
ACTIVATION_FACTOR = 16


def check_input_memory(inp: ImageInput, *, path: str = "model", option: str | None = None) -> None:
    """Refuse an input whose declared size cannot run here (a 3×40000×40000 input is 19 GB per image), before
    anything allocates it; ``option`` names where the size came from (e.g. ``--input-shape 48x192``)."""
    if inp.dynamic_hw:
        return
    per_image = inp.channels * inp.height * inp.width * (2 if inp.elem_type == 10 else 4)
    need = per_image * (inp.static_batch or 1) * ACTIVATION_FACTOR
    avail = available_memory()
    if avail is not None and need > avail:
        gib = 1024 ** 3
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {inp.shape}"
                            + (f" (from {option})" if option else "")
                            + f": {per_image * (inp.static_batch or 1) / gib:.1f} GiB per batch, and running it "
                            f"needs about {ACTIVATION_FACTOR}× that ({need / gib:.1f} GiB); this machine has "
                            f"{avail / gib:.1f} GiB available.",
                            expected="an image input that fits in memory (e.g. 3×224×224: 0.6 MB per image)",
                            fix=("pass a smaller " + option.split()[0]) if option else
                                "export the classifier at the image size it was trained for")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable; None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _not_found(p: Path, what: str) -> SedeployError:
    return SedeployError(f"The {what} '{p}' does not exist.",
                         fix="pass an .onnx file, e.g. one written by `sedeploy export`")


def load_onnx(path: str | os.PathLike, *, what: str = "model", weights: bool = True, check: bool = True):
    """``onnx.load`` with one clear error for a missing, non-ONNX, truncated or invalid file.

    ``weights=False`` skips external weight files (enough for names, types, shapes and metadata).
    ``check`` runs ``onnx.checker.check_model`` and refuses a graph it rejects.
    """
    import onnx
    from google.protobuf.message import DecodeError

    p = require_utf8_path(path, what)
    if not p.exists():
        raise _not_found(p, what)
    if p.is_dir():
        raise SedeployError(f"The {what} '{p}' is a folder, not an ONNX file.", fix="pass the .onnx file itself")
    if p.name == MANIFEST:
        raise SedeployError(f"The {what} '{p}' is the manifest of a build-engine folder, not an ONNX model.",
                            expected="an .onnx file", fix="pass one of the .onnx files it lists (or the folder, "
                                                          "to `sedeploy bench`)")
    engine = next((kind for suffix, kind in NOT_A_MODEL if p.name.endswith(suffix)), None)
    if engine is not None:
        raise SedeployError(f"The {what} '{p}' is {engine}, not an ONNX model.",
                            expected="an .onnx file (an exported model or a sedeploy artifact)",
                            fix="pass the .onnx it was built from (its .json sidecar names it as source_model)")
    if p.stat().st_size == 0:
        raise SedeployError(f"The {what} '{p}' is an empty file (0 bytes), not an ONNX model.",
                            fix="re-export it (`sedeploy export`) or re-copy the file")
    if weights:
        _check_external_data(p, what)
    try:
        # always the binary format: onnx.load would read a .json / .txt name as JSON or text protobuf
        proto = onnx.load(str(p), format="protobuf", load_external_data=weights)
    except (DecodeError, ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as err:
        raise SedeployError(f"The {what} '{p}' is not a readable ONNX file ({type(err).__name__}: {err}); it may be "
                            "truncated or not ONNX at all.",
                            fix="re-export it (`sedeploy export`) or re-copy the file") from err
    if not proto.graph.node:
        raise SedeployError(f"The {what} '{p}' holds no ONNX graph (0 nodes); it is probably not an ONNX model "
                            "or was truncated.", fix="re-export it (`sedeploy export`) or re-copy the file")
    declare_output_shapes(proto)
    if check:
        _check_model(proto, p, what)
    return proto


def declare_output_shapes(proto) -> None:
    """Graph outputs declared without a shape get the type ONNX shape inference derives for them (in place; the
    checker requires a shape, and every consumer reads the class count from it). Outputs it cannot infer stay."""
    for out in proto.graph.output:
        tt = out.type.tensor_type
        if not tt.HasField("shape") or not tt.elem_type:
            inferred = inferred_output_type(proto, out.name)
            if inferred is not None:
                tt.CopyFrom(inferred)


def complete_onnx(head, path: str | os.PathLike, *, what: str = "model"):
    """What ``load_onnx(path)`` returns, from ``head`` = ``load_onnx(path, weights=False, check=False)`` read
    before: ``head`` itself, checked, when every weight is inside the file (nothing is read again), else the file
    loaded again with its external data."""
    if _external_locations(head):
        return load_onnx(path, what=what)
    _check_model(head, Path(path), what)
    return head


def _check_model(proto, p: Path, what: str) -> None:
    """``onnx.checker.check_model``, its refusal as one clear error naming the file."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SedeployError(f"The {what} '{p}' is not a valid ONNX model: {first}",
                            fix="re-export it (`sedeploy export`) or re-copy the file") from err


def _external_locations(head) -> list[str]:
    """The external data files ``head``'s tensors name (sorted, each once)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = [*head.graph.initializer, *(a.t for n in head.graph.node for a in n.attribute if a.HasField("t"))]
    return sorted({ExternalDataInfo(t).location for t in tensors if uses_external_data(t)})


def _check_external_data(p: Path, what: str) -> None:
    """A model whose weights live in external data files must have them beside it (where its tensors say):
    one error naming the missing file(s), not onnx's low-level message."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        head = onnx.load(str(p), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError):
        return  # unreadable: the caller's own load says so
    locations = _external_locations(head)
    missing = [loc for loc in locations if not (p.parent / loc).is_file()]
    if missing:
        raise SedeployError(f"The {what} '{p}' keeps its weights in external data file(s) that are not beside it: "
                            f"{', '.join(str(p.parent / m) for m in missing)}.",
                            expected="the .onnx file together with the data file(s) it names, in the same folder",
                            fix=f"copy or move {', '.join(missing)} next to '{p.name}' (an ONNX model with external "
                                "data is moved together with its data file)")


def as_model(model, *, what: str = "model", weights: bool = True):
    """(ModelProto, label) for a ModelProto or a path — what library functions that accept either need."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory model>"
    return load_onnx(model, what=what, weights=weights, check=False), str(model)


def copy_model(model, *, what: str = "model"):
    """(a private copy of the model, label): passes that edit a graph never modify their caller's proto."""
    import onnx

    proto, label = as_model(model, what=what)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out, label


def save_onnx(proto, path: str | os.PathLike, *, full_check: bool = True, before_publish=None) -> Path:
    """Write ``proto`` to ``path`` atomically: saved under a temporary name, checked (``onnx.checker``, full
    check with shape inference), optionally tested by ``before_publish(tmp_path)``, then renamed into place.
    On any failure nothing is left at ``path``."""
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=full_check)
        if before_publish is not None:
            before_publish(tmp)
    return Path(path)


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


def sha256_file(path: str | os.PathLike, *, what: str = "file") -> str:
    """Hex sha256 of a file's bytes, streamed; a clear error for a dangling link or an unreadable file."""
    p = Path(path)
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise SedeployError(f"The {what} '{p}' cannot be read ({err.strerror or err}).",
                            fix="check that it exists (a symbolic link must point to a real file) and is readable"
                            ) from err
    return h.hexdigest()


def image_input(proto, *, path: str = "model", dynamic_hw: bool = False) -> ImageInput:
    """The model's one 4-D float image input, NCHW or NHWC (told apart by the channel dimension, see
    :func:`input_layout`), or a clear error saying what the model has instead. ``dynamic_hw``: accept dynamic
    H/W (height/width None; the caller pins them), else they must be fixed."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise SedeployError(f"'{path}' has {len(inputs)} graph inputs ({names}).",
                            expected="an image classifier with exactly one N×C×H×W input",
                            fix="export the classifier with a single image input")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem not in (1, 10):  # FLOAT, FLOAT16
        import onnx

        raise SedeployError(f"'{path}' input '{inp.name}' is {onnx.TensorProto.DataType.Name(elem).lower()}.",
                            expected="a float32 (or float16) image tensor",
                            fix="export the classifier with a float input (normalisation inside or before it)")
    dims = inp.type.tensor_type.shape.dim
    shape = [d.dim_param or (d.dim_value if d.dim_value > 0 else "?") for d in dims]
    if len(dims) != 4:
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}.",
                            expected="a 4-D N×C×H×W (or N×H×W×C) image input",
                            fix="sedeploy handles image classifiers; export the model with a 4-D image input")
    stated = {p.key: p.value for p in proto.metadata_props}.get(META.INPUT_LAYOUT)
    layout = input_layout(shape, stated)
    if layout is None:
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}: no dimension 1 holds the channels "
                            "(NCHW) and no dimension 3 does (NHWC).",
                            expected="N×3×H×W (NCHW) or N×H×W×3 (NHWC) with 3 (RGB) channels",
                            fix="export a classifier of 3-channel images with a fixed channel count")
    n = shape[0]
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    if c != 3:
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}: {c} channel(s) ({layout}).",
                            expected=f"3 (RGB or BGR) channels in the {layout} channel dimension",
                            fix="sedeploy feeds colour images; export a 3-channel model")
    fixed = [isinstance(v, int) and v > 0 for v in (h, w)]
    if not all(fixed):
        if not dynamic_hw:
            raise SedeployError(f"'{path}' input '{inp.name}' has shape {shape}: its height and width are dynamic.",
                                expected="an image size to build for (engines, calibration and benchmarks run "
                                         "one fixed H×W)",
                                fix="pin it with `sedeploy build-engine MODEL --input-shape HxW`: the size the model "
                                    "is used at, e.g. --input-shape 224x224 or --input-shape 48x192")
        h, w = (h if fixed[0] else None), (w if fixed[1] else None)
    return ImageInput(inp.name, n, c, h, w, elem, layout)


def name_nodes(proto) -> None:
    """Give every unnamed node a unique name (``<OpType>_<index>``): policies and passes refer to nodes by name."""
    used = {n.name for n in proto.graph.node if n.name}
    for k, n in enumerate(proto.graph.node):
        if not n.name:
            name = f"{n.op_type}_{k}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def inferred_output_type(proto, name: str):
    """The tensor type ONNX shape inference derives for graph output ``name`` (None when it cannot)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError):
        return None
    for vi in (*inferred.graph.output, *inferred.graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return vi.type.tensor_type
    return None


def classifier_output(proto, *, path: str = "model") -> int | None:
    """The class count of a classifier's one N×classes float output (None when the class dimension is symbolic),
    or a clear error for a graph that is not an image classifier (e.g. an elementwise op whose output is 4-D)."""
    outputs = list(proto.graph.output)
    if len(outputs) != 1:
        names = ", ".join(o.name for o in outputs) or "none"
        raise SedeployError(f"'{path}' has {len(outputs)} graph outputs ({names}).",
                            expected="an image classifier with exactly one N×classes logits output",
                            fix="sedeploy builds and benchmarks classifiers; export the model with one logits output")
    out = outputs[0]
    tt = out.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else None
    if dims is None or not tt.elem_type:  # no declared shape/type: what ONNX shape inference derives for it
        tt = inferred_output_type(proto, out.name) or tt
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim] if tt.HasField("shape") else None
    if tt.elem_type not in (1, 10) or dims is None or len(dims) != 2:
        import onnx

        kind = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "untyped"
        raise SedeployError(f"'{path}' is not an image classifier: its output '{out.name}' is {kind} with shape "
                            f"{dims if dims is not None else 'unknown'}.",
                            expected="one float output of shape N×classes (logits or probabilities)",
                            fix="pass a classifier (e.g. from `sedeploy export`); sedeploy measures top-1 on it")
    classes = dims[1]
    if isinstance(classes, int) and classes < 2 and classes != 0:
        raise SedeployError(f"'{path}' has {classes} output class: not a classifier.",
                            expected="N×classes logits with at least 2 classes",
                            fix="pass an image classifier whose output scores every class (a 1-output model, e.g. a "
                                "regressor or binary logit, is not one)")
    return classes if isinstance(classes, int) and classes > 0 else None
