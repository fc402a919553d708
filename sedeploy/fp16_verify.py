"""How an FP16 graph is checked on a CPU: the FP16 emulation, the overflow search, and the verification that
:func:`sedeploy.fp16.convert_fp16` runs before it writes the FP16 artifact.

ONNX Runtime's CPU provider has no FP16 kernels (it computes an FP16 graph in FP32 and rounds only the weights),
so the FP16 numbers come from :func:`fp16_emulation`: a float32 graph that rounds every tensor the FP16 graph
stores to float16 where it is produced. :func:`fp16_overflows` finds the float16 tensors that hold inf or NaN,
also where a later op clips them; :func:`overflow_error` is the one error for them (the INT8 artifacts use both).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sedeploy.errors import SedeployError, VerificationError
from sedeploy.onnxcore import copy_model, cpu_session, pad_to_batch, run_model
from sedeploy.preprocess import smooth_noise

log = logging.getLogger("sedeploy")

#: the FP16 artifact is refused when its max |Δlogit| (emulated) exceeds this share of the largest FP32 logit.
#: Measured: 0.3 % on SE-ResNet-50 (random weights, 300 images), 0.23 % of the range on the tiny trained net; a
#: model whose values cancel after FP16 rounding (a bias of 30000 then −30000) gave 133 %, at 0 % agreement.
FP16_MAX_REL_DRIFT = 0.05


@dataclass
class Fp16Verification:
    inputs: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float


def _data_input(model):
    inits = {t.name for t in model.graph.initializer}
    return next(v for v in model.graph.input if v.name not in inits)


def _input_size(model) -> tuple[int, int] | None:
    """(H, W) of an NCHW input with a fixed size (None otherwise)."""
    dims = _data_input(model).type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
        return dims[2].dim_value, dims[3].dim_value
    return None


def fp16_emulation(model, *, expose: bool = False):
    """A float32 graph that computes what ``model`` (an FP16 graph, or Q/DQ inside one: a ModelProto or a path)
    stores: every tensor the graph types float16 is rounded to float16 where it is produced, and the arithmetic
    in between is float32.

    Why: ONNX Runtime's CPU provider (x86-64) has no FP16 convolution kernels; it runs an FP16 graph with FP32
    kernels (folding the weights to float32, or casting them, and dropping the Cast pairs it inserts), so running
    the FP16 artifact there rounds the weights only, never an activation (an overflow past 65504 could not show).
    Explicit Cast pairs written in the graph are kept, so the emulation rounds each activation as the FP16 graph
    stores it. It models FP16
    *storage* between ops; an FP16 engine (TensorRT) may also accumulate inside a kernel in FP16 and fuse ops
    (rounding less often), so it is a close model, not the engine itself. Run it at optimization "basic" or lower
    (measured: "basic" and "disabled" give identical logits on SE-ResNet-50). ``expose``: every rounded tensor is
    also a graph output (under its own name), so an overflow that a later op clips is seen (:func:`fp16_overflows`).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto, label = copy_model(model, what="FP16 model")
    g = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise SedeployError(f"'{label}' has control-flow subgraphs (If/Loop/Scan), which the FP16 emulation does not "
                            "rewrite.", expected="a graph without subgraphs, as sedeploy's artifacts are")
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {t.name: t.data_type for t in g.initializer}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    f16 = TensorProto.FLOAT16

    def to_fp32(t):
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)

    for i, t in enumerate(g.initializer):
        if t.data_type == f16:
            g.initializer[i].CopyFrom(to_fp32(t))
    nodes = []

    def rounded(name: str, after: list) -> str:
        """A new name for the producer's float32 output; ``after`` gets the Casts that round it to float16 and
        give the rounded value the original name."""
        k = len(nodes) + len(after)
        raw, half = f"{name}__fp32_{k}", f"{name}__fp16_{k}"
        after += [helper.make_node("Cast", [raw], [half], to=f16, name=f"fp16_round_{k}"),
                  helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT, name=f"fp16_back_{k}")]
        return raw

    initializer_names = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.name not in initializer_names and vi.type.tensor_type.elem_type == f16:
            raise SedeployError(f"'{label}' takes a float16 input '{vi.name}'.",
                                expected="float32 inputs (sedeploy's FP16 artifacts keep their inputs float32)")
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f16:
                a.t.CopyFrom(to_fp32(a.t))
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype", "output_dtype") and a.i == f16:
                a.i = TensorProto.FLOAT
        unknown = [o for o in node.output if o and o not in types]
        if unknown and any(types.get(i) == f16 for i in node.input):
            raise SedeployError(f"'{label}': the element type of {unknown[0]!r} (output of {node.op_type} "
                                f"'{node.name}') cannot be inferred, so the FP16 emulation cannot tell whether to "
                                "round it.", fix="run onnx.shape_inference on the model first, or report it")
        after: list = []
        outs = [rounded(o, after) if o and types.get(o) == f16 else o for o in node.output]
        del node.output[:]
        node.output.extend(outs)
        nodes += [node, *after]
    for vi in (*g.input, *g.output):  # (inputs: the initializers some older exports list there)
        if vi.type.tensor_type.elem_type == f16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    if expose:
        have = {o.name for o in g.output}
        g.output.extend(helper.make_empty_tensor_value_info(n.output[0]) for n in nodes
                        if n.name.startswith("fp16_back_") and n.output[0] not in have)
    return proto


def fp16_overflows(model, x: np.ndarray) -> list[str]:
    """The float16 tensors of ``model`` (an FP16 graph, or Q/DQ inside one) that hold inf or NaN on ``x``, in
    graph order, read from :func:`fp16_emulation` with every rounded tensor exposed. Also the ones a later op
    clips (a QuantizeLinear clamps inf to 127; a Min or Clip hides it): an FP16 engine that stores such a tensor
    computes with garbage even where the logits stay finite. Memory: every tensor of the graph for ``x``, so pass
    one or a few images."""
    sess = cpu_session(fp16_emulation(model, expose=True), optimization="basic")
    name, dim0 = sess.get_inputs()[0].name, sess.get_inputs()[0].shape[0]
    if isinstance(dim0, int) and dim0 > 0:  # a fixed-batch model is fed exactly its batch
        x = pad_to_batch(x[:dim0], dim0)
    outs = sess.get_outputs()
    values = sess.run(None, {name: x})
    return [o.name for o, v in zip(outs, values)
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))]


def overflow_error(what: str, bad: list[str]) -> VerificationError:
    """The one error for FP16 tensors that overflow (``bad``: their names, from :func:`fp16_overflows`)."""
    shown = ", ".join(repr(n) for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return VerificationError(f"{what}: {len(bad)} tensor(s) overflow FP16 (inf past ±65504 once rounded): {shown}.",
                             fix="keep the part that produces them in FP32 (--keep-fp32 se / head / se,head for "
                                 "SE-ResNets), or stay with the FP32 model")


def verify_fp16(src, fp16_path: Path, inputs: np.ndarray | None, atol: float | None) -> Fp16Verification | None:
    """Run the written FP16 artifact ``fp16_path`` (it must return float32) and, through :func:`fp16_emulation`,
    compare its logits with the FP32 model ``src`` on ``inputs`` (None: smooth-noise images at the model's input
    size; nothing is run, and None returned, when that size is not static). Raises :class:`VerificationError` for
    non-finite logits, an overflowing FP16 tensor, or a max |Δlogit| above ``atol`` (None: above
    :data:`FP16_MAX_REL_DRIFT` of the largest FP32 logit)."""
    if inputs is None:
        size = _input_size(src)
        if size is None:
            log.warning("FP16: input size unknown (non-static H×W); the artifact was checked but not run")
            return None
        dims = _data_input(src).type.tensor_type.shape.dim
        batch = dims[0].dim_value or 4
        inputs = smooth_noise(batch, size, seed=7)
    raw = run_model(fp16_path, inputs[:1])  # the artifact itself runs in ONNX Runtime and returns float32
    if raw.dtype != np.float32:
        raise VerificationError(f"The FP16 model returns {raw.dtype}, not float32.", fix="report this as a bug")
    # its numbers come from the emulation: ORT's CPU provider would round the weights only
    ref, got = run_model(src, inputs), run_model(cpu_session(fp16_emulation(fp16_path), optimization="basic"), inputs)
    if not np.all(np.isfinite(got)):
        raise VerificationError(
            f"The FP16 model produced {int(np.count_nonzero(~np.isfinite(got)))} non-finite logits (FP16 overflow).",
            fix="keep the overflowing part in FP32 (--keep-fp32 se,head) or stay with the FP32 model")
    bad = fp16_overflows(fp16_path, inputs[:1])
    if bad:
        raise overflow_error("The FP16 model", bad)
    diff = np.abs(ref.astype(np.float64) - got)
    ver = Fp16Verification(inputs=len(inputs), max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                           top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean()))
    scale = float(np.abs(ref).max())
    if atol is None and ver.max_abs_diff > FP16_MAX_REL_DRIFT * scale:
        raise VerificationError(
            f"FP16 max |Δlogit| {ver.max_abs_diff:.3g} is {ver.max_abs_diff / scale:.0%} of the largest FP32 logit "
            f"({scale:.3g}); top-1 agreement {ver.top1_agreement:.1%} on {len(inputs)} image(s). FP16 rounding "
            f"moves logits by well under {FP16_MAX_REL_DRIFT:.0%} of it on sound models; the FP16 .onnx was not "
            "written.", fix="keep the sensitive part in FP32 (--keep-fp32 se / head / se,head), or stay with the "
                            "FP32 model")
    if atol is not None and ver.max_abs_diff > atol:
        raise VerificationError(
            f"FP16 max |Δlogit| {ver.max_abs_diff:.3g} > tolerance {atol:g} (top-1 agreement "
            f"{ver.top1_agreement:.1%}). The FP16 .onnx was not written.",
            fix="keep sensitive parts in FP32 (--keep-fp32 se,head) or relax --atol")
    return ver

