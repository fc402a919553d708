"""The FP16 artifact: an FP32 export rewritten so that weights and activations are float16 in the graph itself.

Why a graph-level FP16 model: TensorRT 11 builds every network strongly typed — the precision is the one the ONNX
graph states, there is no FP16 builder flag any more — so an FP16 engine needs an FP16 graph. Graph inputs and
outputs stay float32 (a Cast at each boundary), so callers feed and read the same arrays as for the FP32 model,
and ONNX Runtime runs the same file on the CPU.

The rewrite is ``onnxconverter_common.float16.convert_float_to_float16`` (keep_io_types, node_block_list), plus
one correction: that converter also stores the weights of the nodes it keeps in FP32 as float16 and casts them
back at run time, which rounds them anyway. :func:`convert_fp16` restores those weights to the original float32
values, so a node kept in FP32 really computes with FP32 weights and activations. It also casts a tensor once
per consumer; duplicate Casts of the same tensor to the same type are merged.

Precision policy (``keep_fp32``), by structure, not by node name (exporters name nodes differently):

- ``"se_gate"``: each SE block's Sigmoid and the 1×1 conv feeding it (the excitation logits);
- ``"se"``: the whole SE branch (squeeze pool, both 1×1 convs, ReLU, Sigmoid, the channel-scaling Mul);
- ``"head"``: the global pool, the flatten/reshape, the classifier Gemm/MatMul (+ Softmax if exported).

The default is :data:`DEFAULT_KEEP_FP32`, chosen from measurements on SE-ResNet-50 (see its comment).

FP16 must never silently be FP32: the :class:`Fp16Report` counts FP16 vs FP32 nodes and weights, and
:func:`convert_fp16` raises when (almost) nothing was converted. Only FP32 models are accepted (an FP16, INT8 or
float64/bfloat16-input model is refused: the artifact's float32 inputs and outputs come from the FP32 model).
The "head" group is the Gemm/MatMul whose result reaches a graph output, so SE blocks written with Gemm FCs are
not mistaken for the classifier.

The written artifact is verified on the CPU through the FP16 emulation (:mod:`sedeploy.fp16_verify`).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from sedeploy.checks import require_strong_typing, summarize_precision
from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.fp16_verify import Fp16Verification, verify_fp16
from sedeploy.fsutil import atomic_path
from sedeploy.onnxcore import META, QDQ_OPS, QOPERATOR_OPS, Graph, copy_model, name_nodes, set_metadata
from sedeploy.passes import se_block_nodes

log = logging.getLogger("sedeploy")

PRECISION_GROUPS = ("se_gate", "se", "head")
#: Measured by benchmarks/experiments/fp16_policy.py (SE-ResNet-50, random weights, 300 ImageNet-val images, every FP16
#: tensor rounded by fp16_emulation; see benchmarks/results/fp16_policy/results.md): max |Δlogit| 0.121 with nothing
#: kept, 0.114 keeping the SE gate, 0.108 the whole SE branch, 0.111 the head, 0.101 SE + head; mean 0.0116–0.0124
#: and 1–3 top-1 flips of 300 for every policy (the same within noise). The drift comes from the 3×3/1×1 trunk
#: convolutions, not from the SE path or the classifier, and each FP32 island costs Casts (34 for the SE groups)
#: that TensorRT must run. On the tiny trained SE-ResNet-18 (tests) all-FP16 agrees on ≥ 99.9 % of held-out
#: images. So the default is all-FP16; the groups stay available for models that do overflow (the verification
#: finds an overflowing FP16 tensor with fp16_overflows, even where a later op clips it).
DEFAULT_KEEP_FP32: tuple[str, ...] = ()
FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0 ** -24
#: Below this share of float weight values in FP16 the result is refused as "not an FP16 model".
MIN_FP16_WEIGHT_FRACTION = 0.5
_POOLS = ("ReduceMean", "GlobalAveragePool")
_FLATTEN = ("Reshape", "Flatten", "Squeeze")
_OTHER_FLOATS = (10, 11, 16)  # TensorProto FLOAT16, DOUBLE, BFLOAT16
#: Ops that may sit between the classifier and the graph output (bias Add, softmax, reshapes).
_HEAD_TAIL = ("Add", "Softmax", "LogSoftmax", "Identity", "Reshape", "Flatten", "Squeeze")


def onnx_type_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type).lower()


@dataclass
class Fp16Report:
    path: str
    keep_fp32: tuple[str, ...]
    kept_fp32_nodes: dict[str, list[str]]  # policy group → node names left in FP32
    nodes_fp16: int  # compute nodes (not Cast/Q/DQ/Constant) reading float16
    nodes_fp32: int  # compute nodes reading float32
    casts: int  # Cast nodes in the result (2 at the graph boundary + one per tensor entering/leaving an FP32 island)
    weights_fp16: int  # float16 initializer values
    weights_fp32: int  # float32 initializer values
    saturated_values: int  # weight values with |w| > 65504 (FP16 max), saturated to ±65504
    tiny_values: int  # weight values with 0 < |w| < 2^-24 (below FP16's smallest subnormal), set to ±2^-24
    precision: dict = field(default_factory=dict)  # checks.summarize_precision of the result
    verification: Fp16Verification | None = None
    strong_typing: dict = field(default_factory=dict)  # checks.check_strong_typing(...).summary()
    seconds: float = 0.0

    @property
    def fp16_weight_fraction(self) -> float:
        total = self.weights_fp16 + self.weights_fp32
        return self.weights_fp16 / total if total else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fp16_weight_fraction"] = round(self.fp16_weight_fraction, 6)
        return d


# -------------------------------------------------------------------------------------------------- policy groups
def parse_keep_fp32(keep_fp32: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"se_gate,head"`` / ``["se_gate", "head"]`` / ``"none"`` / ``None`` → validated tuple of group names."""
    if keep_fp32 is None:
        return ()
    items = keep_fp32.split(",") if isinstance(keep_fp32, str) else list(keep_fp32)
    stripped = [s.strip() for s in items if s and s.strip()]
    if "none" in stripped and len(stripped) > 1:
        raise SedeployError(f"keep_fp32 {keep_fp32!r} names 'none' and groups together.",
                            expected=f"'none', or a comma-separated subset of {', '.join(PRECISION_GROUPS)}",
                            fix="e.g. --keep-fp32 none (everything FP16) or --keep-fp32 head")
    names = [s for s in stripped if s != "none"]
    bad = [s for s in names if s not in PRECISION_GROUPS]
    if bad:
        raise SedeployError(f"Unknown FP32 group(s) {bad} in keep_fp32.",
                            expected=f"a comma-separated subset of {', '.join(PRECISION_GROUPS)}, or 'none'",
                            fix="e.g. --keep-fp32 se_gate,head")
    return tuple(dict.fromkeys(names))


def find_precision_groups(model) -> dict[str, list[str]]:
    """Node names of each policy group in ``model`` (a ModelProto whose nodes all have unique names).

    SE blocks come from the one SE recogniser (:func:`sedeploy.passes.se_block_nodes`), so the blocks a policy
    keeps are exactly the blocks the fusion pass recognises."""
    g = Graph(model)
    groups: dict[str, list[str]] = {name: [] for name in PRECISION_GROUPS}
    for block in se_block_nodes(model):
        groups["se_gate"] += [*block.excite_logits, *block.gate]
        groups["se"] += list(block.all)
    for node in g.nodes:
        if node.op_type in ("Gemm", "MatMul") and not g.is_const(node.input[0]) and g.is_const(node.input[1]) \
                and _reaches_output(g, node):
            groups["head"] += [n.name for n in _head(g, node)]
    return {k: list(dict.fromkeys(v)) for k, v in groups.items()}


def _reaches_output(g: Graph, fc) -> bool:
    """The classifier is the FC whose result reaches a graph output through bias/softmax/reshape only (an SE
    block's FC layers as Gemm/MatMul do not: their result is a channel gate)."""
    out = fc.output[0]
    for _ in range(8):
        if out in g.graph_outputs:
            return True
        nxt = g.consumers.get(out, [])
        if len(nxt) != 1 or nxt[0].op_type not in _HEAD_TAIL:
            return False
        out = nxt[0].output[0]
    return False


def _head(g: Graph, fc) -> list:
    nodes, cur = [fc], fc.input[0]
    while (prev := g.producer.get(cur)) is not None and prev.op_type in _FLATTEN:
        nodes.insert(0, prev)
        cur = prev.input[0]
    if (prev := g.producer.get(cur)) is not None and prev.op_type in _POOLS:
        nodes.insert(0, prev)
    out = fc.output[0]
    for consumer in g.consumers.get(out, []):  # MatMul's bias Add, then a Softmax if the export has one
        if consumer.op_type == "Add" and fc.op_type == "MatMul":
            nodes.append(consumer)
            out = consumer.output[0]
    nodes += [c for c in g.consumers.get(out, []) if c.op_type in ("Softmax", "LogSoftmax")]
    return nodes


# ------------------------------------------------------------------------------------------------------ conversion
def fp16_converter():
    """The FP16 converter sedeploy uses (``onnxconverter_common.float16``), or the missing-dependency error naming
    the ``fp16`` extra."""
    try:
        from onnxconverter_common import float16
    except ImportError as err:
        raise MissingDependencyError("onnxconverter_common", "fp16", "FP16 conversion") from err
    return float16


def _load_fp32(model):
    return copy_model(model, what="FP32 model")[0]  # never modify the caller's model


def _check_convertible(model) -> None:
    g = Graph(model)
    meta = {p.key: p.value for p in model.metadata_props}
    stated = meta.get(META.PRECISION, "").strip('"')
    fp16 = sum(1 for t in model.graph.initializer if t.data_type == 10)
    quant = [n.op_type for n in g.nodes if n.op_type in QDQ_OPS or n.op_type in QOPERATOR_OPS]
    if stated == "fp16" or fp16:
        raise SedeployError(
            f"The model is already FP16 (metadata sedeploy.precision={stated or 'unset'}, {fp16} float16 "
            f"initializer(s)); converting it again would only add Casts.",
            expected="the FP32 ONNX export", fix="run the FP16 conversion on the FP32 .onnx from `sedeploy export`")
    if stated == "int8" or quant:
        raise SedeployError(
            f"The model is quantized ({len(quant)} quantization node(s), e.g. {sorted(set(quant))[:3]}).",
            expected="the FP32 ONNX export", fix="convert the FP32 .onnx to FP16; quantize FP32 separately")
    not_fp32 = {v.name: onnx_type_name(v.type.tensor_type.elem_type) for v in model.graph.input
                if v.name not in g.initializers and v.type.tensor_type.elem_type in _OTHER_FLOATS}
    if not_fp32:
        raise SedeployError(
            f"The model's input(s) {not_fp32} are not float32; the FP16 artifact keeps the FP32 model's float32 "
            f"inputs and outputs, so it must start from a float32 model.",
            expected="the FP32 ONNX export (float32 input)", fix="convert the FP32 .onnx from `sedeploy export`")
    floats = sum(1 for t in model.graph.initializer if t.data_type == 1)
    float_io = [v.name for v in model.graph.input if v.type.tensor_type.elem_type == 1]
    if not floats and not float_io:
        raise SedeployError("The model has no float32 weights or inputs: there is nothing to convert to FP16.",
                            expected="an FP32 classifier ONNX (float32 input 'input', float32 weights)")


def _count_out_of_range(model) -> tuple[int, int]:
    """(values with |w| > 65504, saturated; values with 0 < |w| < 2^-24, raised to ±2^-24 instead of flushed to 0)."""
    from onnx import numpy_helper

    big = tiny = 0
    for t in model.graph.initializer:
        if t.data_type == 1:
            a = np.abs(numpy_helper.to_array(t))
            big += int(np.count_nonzero((a > FP16_MAX) & np.isfinite(a)))
            tiny += int(np.count_nonzero((a > 0) & (a < FP16_MIN_SUBNORMAL)))
    return big, tiny


def _restore_fp32_weights(model, source) -> int:
    """Replace ``Cast(float16 initializer → float)`` by the original float32 initializer; returns how many."""
    from onnx import TensorProto

    g = Graph(model)
    originals = {t.name: t for t in source.graph.initializer if t.data_type == TensorProto.FLOAT}
    remove, add, restored = [], [], 0
    for node in g.nodes:
        if node.op_type != "Cast" or node.input[0] not in g.initializers or node.input[0] not in originals:
            continue
        if g.initializers[node.input[0]].data_type != TensorProto.FLOAT16 or \
                next(a.i for a in node.attribute if a.name == "to") != TensorProto.FLOAT:
            continue
        fp32 = TensorProto()
        fp32.CopyFrom(originals[node.input[0]])
        fp32.name = node.output[0]  # the Cast's output name: consumers stay as they are
        add.append(fp32)
        remove.append(node)
        restored += 1
    for node in remove:
        model.graph.node.remove(node)
    model.graph.initializer.extend(add)
    still_used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for t in [t for t in model.graph.initializer if t.name not in still_used]:
        model.graph.initializer.remove(t)
    return restored


def _restore_fp32_outputs(model, source) -> None:
    """Undo the converter's Cast(float32 → float16) on graph outputs produced by an FP32-kept node.

    With keep_io_types and a blocked last node (the classifier), onnxconverter-common 1.16 casts the FP32 result to
    FP16 and declares the graph output float16. The Cast is dropped and the output declared float32 again.
    """
    from onnx import TensorProto

    float_outputs = {o.name for o in source.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    g = Graph(model)
    for out in model.graph.output:
        cast = g.made_by(out.name, "Cast")
        if out.name not in float_outputs or out.type.tensor_type.elem_type == TensorProto.FLOAT or cast is None:
            continue
        inner = cast.input[0]
        if g.dtype.get(inner) != TensorProto.FLOAT:
            continue
        model.graph.node.remove(cast)
        for node in model.graph.node:  # the FP32 tensor takes the output's name
            node.output[:] = [out.name if o == inner else o for o in node.output]
            node.input[:] = [out.name if i == inner else i for i in node.input]
        for vi in [v for v in model.graph.value_info if v.name in (inner, out.name)]:
            model.graph.value_info.remove(vi)
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _merge_duplicate_casts(model) -> int:
    """The converter casts a tensor once per consumer (the graph input feeding a conv and a skip Add, the block
    input feeding an FP32-kept SE pool and scale): keep one Cast per (tensor, type). Returns how many were removed."""
    first: dict[tuple[str, int], str] = {}
    rename: dict[str, str] = {}
    outputs = {o.name for o in model.graph.output}
    remove = []
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        key = (node.input[0], next(a.i for a in node.attribute if a.name == "to"))
        if key in first:
            rename[node.output[0]] = first[key]
            remove.append(node)
        else:
            first[key] = node.output[0]
    for node in remove:
        model.graph.node.remove(node)
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    for vi in [v for v in model.graph.value_info if v.name in rename]:
        model.graph.value_info.remove(vi)
    return len(remove)


def to_fp16(model, *, keep_fp32: str | Iterable[str] | None = DEFAULT_KEEP_FP32):
    """In-memory conversion: FP32 ModelProto (or path) → (FP16 ModelProto, {group: kept node names},
    (saturated, tiny) weight-value counts)."""
    keep = parse_keep_fp32(keep_fp32)
    src = _load_fp32(model)
    _check_convertible(src)
    name_nodes(src)
    groups = find_precision_groups(src)
    kept = {k: groups[k] for k in keep}
    for k, names in kept.items():
        if not names:
            log.warning("FP16: the FP32 group '%s' matches no node in this model; nothing kept for it", k)
    block = sorted({n for names in kept.values() for n in names})
    out_of_range = _count_out_of_range(src)
    float16 = fp16_converter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one UserWarning per out-of-range tensor; counted in the report instead
        out = float16.convert_float_to_float16(src, min_positive_val=FP16_MIN_SUBNORMAL, max_finite_val=FP16_MAX,
                                               keep_io_types=True, node_block_list=block or None)
    _restore_fp32_weights(out, src)
    _restore_fp32_outputs(out, src)
    _merge_duplicate_casts(out)
    set_metadata(out, {META.PRECISION: "fp16", META.FP16_KEEP_FP32: list(keep)})
    return out, kept, out_of_range


def convert_fp16(fp32_model, out_path, *, keep_fp32: str | Iterable[str] | None = DEFAULT_KEEP_FP32,
                 verify_inputs: np.ndarray | None = None, atol: float | None = None) -> Fp16Report:
    """Write the FP16 artifact of ``fp32_model`` (ModelProto or path) to ``out_path``; return what was converted.

    Inputs/outputs stay float32; everything else is float16 except the ``keep_fp32`` groups (see module doc).
    The file is checked (``onnx.checker`` full check), run in ONNX Runtime next to the FP32 model on
    ``verify_inputs`` (default: 4 smooth-noise images at the model's input size) and written atomically.
    Raises :class:`SedeployError` for a model that is already FP16/INT8 or would stay mostly FP32, and
    :class:`VerificationError` for non-finite outputs or, when ``atol`` is given, a max |Δlogit| above it.
    """
    import onnx

    t0 = time.perf_counter()
    keep = parse_keep_fp32(keep_fp32)
    _check_verify_inputs(verify_inputs)
    src = _load_fp32(fp32_model)
    m16, kept, (saturated, tiny) = to_fp16(src, keep_fp32=keep)
    summary = summarize_precision(m16)
    totals = summary["totals"]
    inits = summary["initializers"]
    report = Fp16Report(
        path=str(out_path), keep_fp32=keep, kept_fp32_nodes=kept, nodes_fp16=totals.get("fp16", 0),
        nodes_fp32=totals.get("fp32", 0), casts=summary["boundary"].get("Cast", 0),
        weights_fp16=inits.get("FLOAT16", {}).get("elements", 0),
        weights_fp32=inits.get("FLOAT", {}).get("elements", 0), saturated_values=saturated, tiny_values=tiny,
        precision=summary)
    _check_converted(m16, report)
    report.strong_typing = require_strong_typing(m16, str(out_path)).summary()
    with atomic_path(out_path) as tmp:
        onnx.save(m16, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        report.verification = verify_fp16(src, tmp, verify_inputs, atol)
    report.seconds = round(time.perf_counter() - t0, 2)
    if saturated:
        log.warning("FP16: %d weight value(s) exceed FP16's range (|w| > %g) and were saturated", saturated, FP16_MAX)
    return report


def _check_converted(m16, report: Fp16Report) -> None:
    bad_io = [v.name for v in (*m16.graph.input, *m16.graph.output) if v.type.tensor_type.elem_type != 1]
    if bad_io:
        raise SedeployError(f"FP16 conversion changed the graph inputs/outputs {bad_io} away from float32.",
                            fix="report this as a bug")
    if report.nodes_fp16 == 0 or report.fp16_weight_fraction < MIN_FP16_WEIGHT_FRACTION:
        raise SedeployError(
            f"FP16 conversion left the model essentially FP32: {report.nodes_fp16} FP16 vs {report.nodes_fp32} "
            f"FP32 compute nodes, {report.fp16_weight_fraction:.1%} of the weight values in FP16 "
            f"(keep_fp32={list(report.keep_fp32)}).",
            expected=f"at least {MIN_FP16_WEIGHT_FRACTION:.0%} of the weights in FP16",
            fix="keep fewer groups in FP32 (e.g. --keep-fp32 none)")


def _check_verify_inputs(inputs) -> None:
    if inputs is None:
        return
    if not isinstance(inputs, np.ndarray) or inputs.dtype != np.float32 or inputs.ndim != 4:
        what = f"{inputs.dtype} array of shape {list(inputs.shape)}" if isinstance(inputs, np.ndarray) \
            else type(inputs).__name__
        raise SedeployError(f"verify_inputs is a {what}.", expected="a float32 N×C×H×W numpy array (preprocessed "
                            "images, as the FP32 model takes them)", fix="pass images.astype(np.float32)")
