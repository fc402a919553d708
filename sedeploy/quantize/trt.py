"""The TensorRT INT8 flavour: Q/DQ inside the FP16 graph.

``flavour="trt"`` — what TensorRT's ONNX parser imports as explicit quantization (checked by
    :func:`sedeploy.checks.check_trt_qdq`), *inside the FP16 graph*: TensorRT builds every network strongly
    typed (11; the flag on 10.x), so each DequantizeLinear outputs its scale's type and everything between the
    quantized convolutions runs in the graph's float type. Q/DQ on an FP32 graph would make all of it FP32. So the
    FP32 model is first converted exactly as the FP16 artifact is (:func:`sedeploy.fp16.to_fp16`, the same
    keep-FP32 policy; float32 inputs/outputs through boundary Casts), upgraded to opset 19 (float16 scales), and
    the Q/DQ nodes get scales in the float type of the tensor they quantize (float16; float32 only inside a
    keep-FP32 group). QuantizeLinear/DequantizeLinear pairs with signed int8 and zero point 0 everywhere;
    activations per tensor (scale = amax/127, amax from the calibration); weights stored as int8 initializers, per
    output channel (Conv axis 0; Gemm axis 0 with transB=1, else 1) quantized from the exact FP32 weights, read
    through a DequantizeLinear; every scale ≥ 2^-14 (the smallest normal float16); biases stay float (no int32
    bias DequantizeLinear). Placement follows NVIDIA's advice: a Q/DQ pair on the data input of every Conv/Gemm
    and on the *skip* input of every residual Add; Sigmoid, ReduceMean and pools read float. The Q/DQ nodes are
    inserted here rather than by ``onnxruntime.quantization``: its QDQ quantizer puts pairs on operator outputs
    and on both Add inputs, the opposite of what TensorRT fuses best. The result must pass
    :func:`sedeploy.checks.check_strong_typing` (typed as TensorRT's strongly typed parser types it) before it is
    written; its report says how many compute ops are typed FP32 (0 with the default policy).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.fp16 import DEFAULT_KEEP_FP32, to_fp16
from sedeploy.onnxcore import Graph, attr, compute_depths, default_opset
from sedeploy.quantize.calibration import CalibrationResult, activation_tensors
from sedeploy.quantize.source import MIN_OPSET, WEIGHTED, check_ranges, se_nodes

#: The TensorRT flavour's opset: QuantizeLinear/DequantizeLinear take float16 scales from opset 19.
TRT_OPSET = 19
#: Smallest normal float16 (2^-14): the floor of every scale of the TensorRT flavour (a subnormal or zero scale
#: loses precision in FP16 and an all-zero tensor/channel still needs a positive scale).
FP16_MIN_NORMAL = 2.0 ** -14
_INT8_MAX = 127.0
_SCALE_TYPES = {1: np.float32, 10: np.float16}  # TensorProto FLOAT, FLOAT16 → scale dtype


def _range_source(g: Graph, tensor: str, src_outputs: dict[str, list[str]]) -> str:
    """The FP32 model's tensor that a tensor of the FP16 graph carries (its calibration range key): back through
    the converter's Casts, then by producing node name and output index (the converter renames the outputs of
    nodes it keeps in FP32)."""
    for _ in range(4):
        cast = g.made_by(tensor, "Cast")
        if cast is None:
            break
        tensor = cast.input[0]
    node = g.producer.get(tensor)
    if node is not None and node.name in src_outputs:
        k = list(node.output).index(tensor)
        if k < len(src_outputs[node.name]):
            return src_outputs[node.name][k]
    return tensor


def _upgrade_opset(model, label: str):
    """float16 Q/DQ scales need opset ≥ 19 (QuantizeLinear/DequantizeLinear-19 accept float16 scales)."""
    from onnx import version_converter

    if (default_opset(model) or 0) >= TRT_OPSET:
        return model
    try:
        return version_converter.convert_version(model, TRT_OPSET)
    except Exception as err:  # the converter raises bare Exception / RuntimeError subclasses per adapter
        raise SedeployError(f"Upgrading '{label}' from opset {default_opset(model)} to {TRT_OPSET} failed ({err}); "
                            f"float16 Q/DQ scales need opset {TRT_OPSET}.",
                            fix=f"re-export at opset {TRT_OPSET} or newer (`sedeploy export --opset 20`)") from err


def write_trt(model, calibration: CalibrationResult, se: str, label: str, exclude: set[str], options=None,
              keep_fp32=None):
    """Insert TensorRT-style Q/DQ into the FP16 graph of ``model`` (see module docstring). ``keep_fp32``: the FP16
    keep-FP32 policy (None: the FP16 artifact's default); ``options`` is for the CPU flavours' table rows only.

    Returns (quantized ModelProto, settings for the report)."""
    from onnx import helper, numpy_helper

    keep_fp32 = DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32

    if (default_opset(model) or 0) < MIN_OPSET:
        raise SedeployError(f"'{label}' has opset {default_opset(model)}; TensorRT's per-channel Q/DQ needs "
                            f"≥ {MIN_OPSET}.",
                            fix="re-export with --opset 13 or newer (18 is the default)")
    src_weights = Graph(model)  # exact FP32 weights: quantized from these, not from their FP16 rounding
    skip_se = se_nodes(model) if se == "fp32" else set()
    m16, kept, _ = to_fp16(model, keep_fp32=keep_fp32)
    m16 = _upgrade_opset(m16, label)
    g = Graph(m16)
    skip = skip_se | exclude
    weighted = [n for n in g.nodes if n.op_type in WEIGHTED and n.name not in skip and len(n.input) > 1
                and g.is_const(n.input[1]) and not g.is_const(n.input[0])]
    depth = compute_depths(g)
    act_uses: dict[str, list[tuple]] = {}  # tensor → [(node, input index)] to rewire to its DQ output
    for n in weighted:
        act_uses.setdefault(n.input[0], []).append((n, 0))
    for n in g.nodes:
        if n.op_type == "Add" and n.name not in exclude and len(n.input) == 2 and \
                not any(g.is_const(i) for i in n.input):
            k = min((0, 1), key=lambda j: depth.get(n.input[j], 0))
            act_uses.setdefault(n.input[k], []).append((n, k))
    src_outputs = {n.name: list(n.output) for n in model.graph.node}
    sources = {t: _range_source(g, t, src_outputs) for t in act_uses}
    acts = set(activation_tensors(model))  # an Add of shape arithmetic (int64) is no activation to quantize
    sources = {t: src for t, src in sources.items() if src in acts}
    act_uses = {t: uses for t, uses in act_uses.items() if t in sources}
    check_ranges(model, calibration, list(sources.values()), label)

    new_nodes: dict[str, list] = {}  # producer output (or graph input) → Q/DQ nodes to insert after it
    zp8 = "sedeploy_zp_int8"
    new_inits = [numpy_helper.from_array(np.zeros((), np.int8), zp8)]
    clamped = {"activations": 0, "weight_channels": 0}
    scale_types = Counter()
    for t, uses in act_uses.items():
        sdt = _scale_dtype(g, t, label)
        scale = calibration.amax(sources[t]) / _INT8_MAX
        clamped["activations"] += scale < FP16_MIN_NORMAL
        s_name, q_out, dq_out = f"{t}_scale", f"{t}_QuantizeLinear", f"{t}_DequantizeLinear"
        new_inits.append(numpy_helper.from_array(np.array(max(scale, FP16_MIN_NORMAL), sdt), s_name))
        scale_types[np.dtype(sdt).name] += 1
        nodes = [helper.make_node("QuantizeLinear", [t, s_name, zp8], [q_out], name=f"{t}_Q"),
                 helper.make_node("DequantizeLinear", [q_out, s_name, zp8], [dq_out], name=f"{t}_DQ")]
        new_nodes.setdefault(t, []).extend(nodes)
        for node, k in uses:
            node.input[k] = dq_out
    for n in weighted:
        w_name = n.input[1]
        sdt = _scale_dtype(g, w_name, label)
        exact = src_weights.const(w_name)
        w = (exact if exact is not None and exact.shape == g.const(w_name).shape else g.const(w_name))
        w = w.astype(np.float32)
        axis = 0 if n.op_type == "Conv" or attr(n, "transB", 0) else 1
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        raw = amax / _INT8_MAX
        clamped["weight_channels"] += int(np.count_nonzero(raw < FP16_MIN_NORMAL))
        scale = np.maximum(raw, FP16_MIN_NORMAL).astype(sdt)  # rounded to the scale type first, then used
        shape = [1] * w.ndim
        shape[axis] = -1
        wq = np.clip(np.rint(w / scale.astype(np.float32).reshape(shape)), -127, 127).astype(np.int8)
        base = f"{w_name}_{n.name}"
        new_inits += [numpy_helper.from_array(wq, f"{base}_int8"), numpy_helper.from_array(scale, f"{base}_scale"),
                      numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{base}_zp")]
        scale_types[np.dtype(sdt).name] += 1
        dq = helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_scale", f"{base}_zp"],
                              [f"{base}_DequantizeLinear"], name=f"{base}_DQ", axis=axis)
        new_nodes.setdefault(f"__before__{n.name}", []).append(dq)
        n.input[1] = dq.output[0]
    _place_nodes(m16, new_nodes, new_inits)
    return m16, {"activation_type": "int8 symmetric per-tensor", "weight_type": "int8 symmetric per-channel (axis 0)",
                 "float_type": "float16 (FP16 graph; FP32 only at the boundary Casts and in keep_fp32 groups)",
                 "keep_fp32": list(kept), "kept_fp32_nodes": sum(len(v) for v in kept.values()),
                 "scale_types": dict(scale_types), "scale_floor": FP16_MIN_NORMAL, "clamped_scales": clamped,
                 "opset": default_opset(m16), "bias": "float (the graph's float type)",
                 "activation_qdq": len(act_uses), "weight_dq": len(weighted), "excluded_se_nodes": len(skip_se),
                 "excluded_nodes": sorted(exclude)}


def _scale_dtype(g: Graph, tensor: str, label: str):
    """A Q/DQ scale has the float type of the tensor it quantizes: strong typing makes the DequantizeLinear output
    its scale's type, so this keeps the consumer in the type the FP16 policy gave it."""
    dt = g.dtype.get(tensor)
    if dt not in _SCALE_TYPES:
        raise SedeployError(f"Tensor '{tensor}' of '{label}' has element type {dt}, not float16/float32: it cannot "
                            "be quantized.", fix="report this as a bug")
    return _SCALE_TYPES[dt]


def _place_nodes(model, new_nodes: dict[str, list], new_inits: list) -> None:
    """Rebuild the node list in topological order — Q/DQ right after their tensor's producer, weight DQs right
    before their consumer — and drop initializers nothing reads any more."""
    ordered = []
    for t in [i.name for i in model.graph.input]:
        ordered += new_nodes.pop(t, [])
    for n in list(model.graph.node):
        ordered += new_nodes.pop(f"__before__{n.name}", [])
        ordered.append(n)
        for o in n.output:
            ordered += new_nodes.pop(o, [])
    if new_nodes:
        raise SedeployError(f"Internal error: Q/DQ for {list(new_nodes)[:3]} found no place in the graph.")
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    del model.graph.value_info[:]  # stale shapes/types of rewired tensors; checker infers them again

