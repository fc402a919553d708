"""INT8 artifacts: one :class:`~sedeploy.calibration.CalibrationResult`, two Q/DQ flavours.

Why two flavours: the runtimes that consume an INT8 ONNX disagree on what a good one looks like.

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

``flavour="cpu"`` — what ONNX Runtime's CPU kernels run fastest on a machine without VNNI (measured: signed int8
    QDQ is *slower* than FP32 there): ONNX Runtime's own quantizer in QOperator format with uint8 activations and
    int8 weights (U8S8), weights with 7-bit range (``reduce_range``, avoids the int16 saturation of the AVX2
    u8×s8 multiply-add), driven with *our* ranges (a ``TensorsData`` built from the calibration, never ORT's own
    calibrators). The SE squeeze (ReduceMean over H,W) is first rewritten to the equivalent GlobalAveragePool so
    that it, the Sigmoid gate, the channel-scaling Mul and the residual Add all get com.microsoft QLinear kernels
    and activations stay uint8 from one convolution to the next. The settings are the measured optimum of
    ``benchmarks/experiments/int8_cpu_forms.py`` (see :data:`CPU_OPTIONS` and
    benchmarks/results/int8_cpu_forms/results.md).

``flavour="ov"`` — what OpenVINO's CPU plugin runs fastest and most faithfully (measured in
    benchmarks/results/openvino_peers/results.md): the CPU flavour's quantizer and placement (every op of :data:`CPU_OPTIONS`,
    squeeze as GlobalAveragePool) written as Q/DQ (:data:`OV_OPTIONS`), with int8 symmetric activations where a
    tensor has negative values and uint8 with zero point 0 after a ReLU (all 8 bits, no zero-point arithmetic;
    NNCF's choice), and 7-bit weights (``reduce_range``) like the CPU flavour: on a CPU without VNNI (AVX2)
    OpenVINO's int8 kernels sum pairs of uint8·int8 products in int16, which full 8-bit weights overflow — the same
    artifact then loses 25 points of top-1 agreement on SqueezeNet 1.1 that it keeps on a VNNI/AMX CPU
    (benchmarks/results/zoo_int8/); with 7 bits it gives the same predictions on both. Other SE placements (NNCF's float excitation, squeeze-first) were measured and are not faster
    (benchmarks/results/ov_se_forms/). OpenVINO cannot read the QOperator CPU
    flavour at all (QLinearConv with per-channel scales and the com.microsoft QLinear ops fail to convert).

SE policy (``se``): ``"fp32"`` keeps the SE path (squeeze, both FCs, gate, scale) in float — in the TensorRT
flavour that is the FP16 graph's float16 unless the keep-FP32 policy says otherwise —, ``"int8"`` quantizes it
like the rest. :data:`DEFAULT_SE_POLICY` is chosen from measured drift and speed (benchmarks/results/int8_cpu_forms/results.md).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy.calibration import CalibrationResult, activation_tensors
from sedeploy.checks.strong_typing import require_strong_typing
from sedeploy.errors import SedeployError
from sedeploy.onnxcore import (META, QDQ_OPS, QOPERATOR_OPS, Graph, attr, compute_depths, copy_model, default_opset,
                               get_metadata, image_input, is_quantized, name_nodes, run_model, save_onnx, set_metadata,
                               sha256_file)

log = logging.getLogger("sedeploy")

FLAVOURS = ("trt", "cpu", "ov")
SE_POLICIES = ("fp32", "int8")
#: Chosen by benchmarks/experiments/int8_cpu_forms.py on the trained reference SE-ResNet-50 (Imagenette val,
#: 3,925 images):
#: quantizing SE runs 1.97× FP32 at batch 8 against 1.60× with SE in FP32, for 97.9 % vs 98.1 % top-1 agreement
#: and equal top-1 — 0.2 pt of agreement is not worth 19 % of the speed.
DEFAULT_SE_POLICY = "int8"
HEAD_POLICIES = ("float", "int8")
#: The classifier head (the last weighted layer: a 2048→classes Gemm in SE-ResNet-50, ~0.01 % of the FLOPs) per
#: flavour, by measurement on the trained reference (benchmarks/results/reference_int8/, top-1 agreement with FP32 on
#: 3,925 Imagenette val images, mse ranges): kept in float, the OpenVINO form goes from 98.32 to 98.62 % and the
#: ONNX Runtime CPU form from 97.91 to 98.14 % (val-69.9 checkpoint, AMX Xeon), with batch-8 speed within the timing
#: noise (OpenVINO 5.41× vs 5.56× FP32, ONNX Runtime 3.01× vs 2.95×, same interleaved run); on the val-70.4
#: checkpoint OpenVINO 98.98 → 99.11 %, ONNX Runtime 99.06 → 99.01 % (within noise). The TensorRT form measured 97.25 % either way (a
#: one-off check, the artifact run by ONNX Runtime CPU on the same images; not in the committed results), so it keeps
#: the head in INT8 (NVIDIA's placement, no float weighted layer for the checker to flag).
DEFAULT_HEAD_POLICY = {"cpu": "float", "ov": "float", "trt": "int8"}
MIN_OPSET = 13  # per-channel (axis) Q/DQ
#: The TensorRT flavour's opset: QuantizeLinear/DequantizeLinear take float16 scales from opset 19.
TRT_OPSET = 19
#: Smallest normal float16 (2^-14): the floor of every scale of the TensorRT flavour (a subnormal or zero scale
#: loses precision in FP16 and an all-zero tensor/channel still needs a positive scale).
FP16_MIN_NORMAL = 2.0 ** -14
_SMALLEST_SCALE = 1e-12  # weight fake-quantization for bias correction: an all-zero channel still has a scale
_INT8_MAX = 127.0
_SCALE_TYPES = {1: np.float32, 10: np.float16}  # TensorProto FLOAT, FLOAT16 → scale dtype
_WEIGHTED = ("Conv", "Gemm")


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU flavour is quantized (the fields benchmarks/experiments/int8_cpu_forms.py explores)."""

    format: str = "qoperator"  # "qoperator" (QLinearConv …) or "qdq" (ORT fuses QDQ groups at session creation)
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: no u8×s8 int16 saturation on AVX2 without VNNI
    #: op types quantized besides Conv/Gemm; their QLinear kernels keep activations uint8 between layers. A Clip is
    #: quantized only as a bounded ReLU (a constant lower bound of 0: ReLU6, hard-swish's Clip): the quantizer then
    #: drops it and the producer's output is rounded once, on the Clip's range, as with Relu — left out, the
    #: producer's *pre-activation* range (wide, signed) rounds it first and the Clip's range again (MobileNet-V1
    #: 0.25, OpenVINO form: 70.9 → 90.3 % top-1 agreement, benchmarks/results/zoo_int8/). Other Clips stay float.
    extra_ops: tuple[str, ...] = ("Add", "Mul", "Sigmoid", "GlobalAveragePool", "Relu", "Clip", "MaxPool",
                                  "Reshape", "Flatten")
    squeeze_as_gap: bool = True  # rewrite ReduceMean(H,W) to GlobalAveragePool (QLinearGlobalAveragePool exists)
    #: QDQ only: tensors with negative values as int8 symmetric (zero point 0), the rest uint8 (a post-ReLU range
    #: starts at 0, so its zero point is 0 too) — no zero-point arithmetic left for the int8 kernels (NNCF's choice)
    signed_activations: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["extra_ops"] = list(self.extra_ops)
        return d


#: Measured (benchmarks/results/int8_cpu_forms/results.md, trained reference): 1.97× FP32 at batch 8, 97.9 % top-1 agreement —
#: as fast as any form and within 0.5 pt of the most faithful one (conv-only, 98.4 %, 1.59×).
CPU_OPTIONS = CpuOptions()
#: The OpenVINO flavour: the CPU flavour's ops as Q/DQ, full 8-bit weights. Measured interleaved with OpenVINO +
#: NNCF INT8 (benchmarks/results/openvino_peers/results.md): SE-ResNet-50/101 0.82–1.01× NNCF's speed (a loaded
#: machine), 1.3–1.8× the int8-trt artifact on OpenVINO; tiny trained model 99.6 % top-1 agreement vs NNCF's 98.4 %.
#: ``signed_activations`` (benchmarks/results/ov_signedness/, SE-ResNet-50, interleaved with OpenVINO + NNCF INT8 on a
#: quiet machine): 1.04× / 1.01× NNCF at batch 1 / 8 instead of 0.98× / 0.94× with uint8 asymmetric activations;
#: agreement with FP32 99.8 % (was 99.6 %) on the tiny trained network, 88.0 % (was 89.0 %; NNCF 87.3 %) on the
#: random-weight SE-ResNet-50.
#: ``reduce_range`` (7-bit weights) since the zoo measurement (benchmarks/results/zoo_int8/, 64 calibration images,
#: agreement with FP32 on the other 1,236 of imagenet-val-1300, OpenVINO 2026.4 on an AMX Xeon and on the same
#: Xeon restricted to AVX2 with ONEDNN_MAX_CPU_ISA=AVX2, bias correction on): full 8-bit weights give SqueezeNet 1.1
#: 97.9 % on AMX but 72.3 % on AVX2 (int16 overflow), MobileNet-V1 0.25 90.6 / 84.4 %; 7-bit weights 96.3 / 96.3 %
#: and 90.3 / 90.4 %; SE-ResNet-50 (random weights, 300 images) 88.7 / 88.7 % where 8-bit gave 89.0 / 84.3 %, the
#: tiny trained SE-ResNet-18 99.8 / 99.8 %. The price on a VNNI/AMX CPU is up to 1.6 points against 8-bit weights;
#: ``dataclasses.replace(OV_OPTIONS, reduce_range=False)`` gives them back where only such CPUs run the artifact.
OV_OPTIONS = CpuOptions(format="qdq", reduce_range=True, signed_activations=True)


@dataclass
class QuantReport:
    path: str
    flavour: str
    se: str
    format: str  # "QDQ" or "QOperator"
    quantized_ops: dict[str, int]  # op type → nodes computing in int8 (QLinearConv …, or Conv fed by DQ)
    op_histogram: dict[str, int]  # every op type of the written graph
    calibration: dict  # method, key, images
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ helpers
def _onnx():
    import onnx

    return onnx


def _load_fp32(fp32_path):
    """Load and copy the model (nodes named: the SE policy excludes nodes by name); refuse anything that is not
    an FP32 classifier with one float32 image input."""
    onnx = _onnx()
    model, label = copy_model(fp32_path, what="FP32 model")
    stated = str(get_metadata(model).get(META.PRECISION, ""))
    fp16 = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    if stated not in ("", "fp32") or is_quantized(model) or fp16:
        quant = sorted({n.op_type for n in model.graph.node if n.op_type in QDQ_OPS or n.op_type in QOPERATOR_OPS})
        raise SedeployError(
            f"'{label}' is not an FP32 model (metadata {META.PRECISION}={stated or 'unset'}, quantization ops "
            f"{quant or 'none'}, {fp16} float16 initializer(s)).",
            expected="the FP32 ONNX export that the calibration ran on",
            fix="quantize the FP32 .onnx from `sedeploy export` (not an FP16 or INT8 artifact)")
    inp = image_input(model, path=label)
    if inp.elem_type != onnx.TensorProto.FLOAT:
        raise SedeployError(f"'{label}' input '{inp.name}' is not float32.",
                            expected="an FP32 classifier with one N×3×H×W float32 input",
                            fix="quantize the FP32 model")
    name_nodes(model)
    _constants_to_initializers(model)
    return model, label


def _constants_to_initializers(model) -> int:
    """Move ``Constant`` nodes holding a tensor into initializers (in place). Legacy-exported graphs write scalars
    such as hard-sigmoid's 3 and 6 as Constant nodes; quantizers treat initializers as constants but would look for
    an activation range for a Constant node's output. Returns how many were moved."""
    keep, moved = [], 0
    names = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        value = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if value is None or len(n.output) != 1 or n.output[0] in names:
            keep.append(n)
            continue
        t = type(value)()
        t.CopyFrom(value)
        t.name = n.output[0]
        model.graph.initializer.append(t)
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def _se_nodes(model) -> set[str]:
    """Names of every SE block's nodes, from the one SE recogniser."""
    from sedeploy.passes import se_block_nodes

    return {name for block in se_block_nodes(model) for name in block.all}


def _check_ranges(model, calibration: CalibrationResult, tensors: list[str], label: str) -> None:
    missing = [t for t in dict.fromkeys(tensors) if t not in calibration.ranges]
    if missing:
        raise SedeployError(
            f"The calibration (method {calibration.method}, key {calibration.key[:12]}…) has no range for "
            f"{len(missing)} activation(s) of '{label}', e.g. {missing[:4]}: it does not match this model.",
            expected="a calibration of this very FP32 model (sedeploy.calibration.calibrate on the same .onnx)",
            fix="calibrate this model (or pass --calib-cache pointing at its own cache file)")
    bad = [t for t in tensors if not all(np.isfinite(calibration.ranges[t]))]
    if bad:
        raise SedeployError(f"Calibration ranges of {bad[:4]} are not finite.", fix="recalibrate")


#: symmetric weight levels: full int8 [-127, 127] (TensorRT); ORT's reduce_range int8 [-64, 64] (CPU, OpenVINO)
_WEIGHT_QMAX_FULL, _WEIGHT_QMAX_REDUCED = 127.0, 64.0
#: On for both flavours, by measurement (benchmarks/results/int8_calibration/, every layer INT8, percentile ranges,
#: top-1 agreement / mean KL vs FP32). CPU flavour (7-bit weights): tiny SE-ResNet-18 99.4 → 99.6 %, KL 5.70e-3 →
#: 4.94e-3; foreign MobileNetV3-like 99.67 → 100 %; SE-ResNet-50 (random weights, real images) 86.5 → 90.6 %, KL
#: 0.167 → 0.099. TensorRT flavour: tiny 99.0 → 99.4 % (KL 9.19e-3 → 1.00e-2, the one worse KL), foreign
#: 99.67 → 100 %, SE-ResNet-50 KL 0.087 → 0.079. Never lower agreement with the default estimator.
#: OpenVINO flavour (benchmarks/results/zoo_int8/, 7-bit weights, agreement with FP32): MobileNet-V1 0.25 69.6 →
#: 90.3 % (its depthwise weights, quantized per channel, shift the channel means most), SqueezeNet 1.1 95.0 →
#: 96.3 %; tiny SE-ResNet-18 99.2 → 99.8 %, SE-ResNet-50 (random weights, 300 images) 86.7 → 88.7 %.
DEFAULT_BIAS_CORRECTION = {"cpu": True, "trt": True, "ov": True}


def _fake_quant(w: np.ndarray, axis: int, qmax: float) -> np.ndarray:
    """Symmetric per-channel (``axis``) quantize → dequantize, as both flavours quantize weights."""
    moved = np.moveaxis(w, axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.maximum(amax / qmax, _SMALLEST_SCALE).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.moveaxis(np.clip(np.rint(moved / scale), -qmax, qmax) * scale, 0, axis)


def _correct_biases(model, calibration: CalibrationResult, qmax: float, skip: set[str]) -> int:
    """Bias correction (Nagel et al. 2019, "Data-free quantization", empirical form): quantizing a weight W to W_q
    shifts the layer's expected output by (W_q − W)·E[x]; subtracting that from the bias restores the mean. E[x] is
    the per-channel mean of the layer's input over the calibration images (``calibration.channel_means``; a
    zero-padded border is treated like the interior). ``qmax``: the weights' symmetric levels. In place; returns
    how many layers were corrected."""
    from onnx import numpy_helper

    g = Graph(model)
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for n in g.nodes:
        if n.op_type not in _WEIGHTED or n.name in skip or len(n.input) < 2 or n.input[1] not in inits:
            continue
        mean = calibration.channel_means.get(n.input[0])
        if mean is None or attr(n, "transA", 0):
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        m = np.asarray(mean, np.float64)
        if n.op_type == "Conv":
            dw = (_fake_quant(w, 0, qmax) - w).reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [out, in/groups]
            groups = int(attr(n, "group", 1))
            per_group = w.shape[0] // groups
            idx = (np.arange(w.shape[0])[:, None] // per_group) * w.shape[1] + np.arange(w.shape[1])[None, :]
            if idx.max() >= m.size:
                continue
            delta = (dw * m[idx]).sum(1)
            scale = 1.0
        else:
            axis = 0 if attr(n, "transB", 0) else 1
            dw = _fake_quant(w, axis, qmax) - w
            dw = dw if axis == 0 else dw.T  # [out, in]
            if dw.shape[1] != m.size:
                continue
            delta = dw @ m
            scale = float(attr(n, "beta", 1.0)) or 1.0
        old = n.input[2] if len(n.input) > 2 and n.input[2] else None
        b = numpy_helper.to_array(inits[old]).astype(np.float64) if old in inits else np.zeros(delta.shape)
        if old is not None and old not in inits:
            continue  # a computed bias: leave the layer alone
        if b.shape != delta.shape:
            continue
        name = f"{n.name}_bias_corrected"
        model.graph.initializer.append(numpy_helper.from_array((b - delta / scale).astype(np.float32), name))
        if old is None:
            n.input.append(name)
        else:
            n.input[2] = name
        done += 1
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used or t.name not in inits]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


# ------------------------------------------------------------------------------------------------- TRT flavour
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


def _trt_quantize(model, calibration: CalibrationResult, se: str, label: str, keep_fp32, exclude: set[str]):
    """Insert TensorRT-style Q/DQ into the FP16 graph of ``model`` (see module docstring).

    Returns (quantized ModelProto, settings for the report)."""
    from onnx import helper, numpy_helper

    from sedeploy.fp16 import to_fp16

    if (default_opset(model) or 0) < MIN_OPSET:
        raise SedeployError(f"'{label}' has opset {default_opset(model)}; TensorRT's per-channel Q/DQ needs "
                            f"≥ {MIN_OPSET}.",
                            fix="re-export with --opset 13 or newer (18 is the default)")
    src_weights = Graph(model)  # exact FP32 weights: quantized from these, not from their FP16 rounding
    skip_se = _se_nodes(model) if se == "fp32" else set()
    m16, kept, _ = to_fp16(model, keep_fp32=keep_fp32)
    m16 = _upgrade_opset(m16, label)
    g = Graph(m16)
    skip = skip_se | exclude
    weighted = [n for n in g.nodes if n.op_type in _WEIGHTED and n.name not in skip and len(n.input) > 1
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
    _check_ranges(model, calibration, list(sources.values()), label)

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


# ------------------------------------------------------------------------------------------------- CPU flavour
def _cpu_quantize(model, calibration: CalibrationResult, se: str, label: str, options: CpuOptions,
                  exclude: frozenset = frozenset()):
    """ONNX Runtime's public ``quantize_static`` (QOperator or QDQ, U8S8) driven with *our* ranges: they are written
    in ORT's own calibration-cache format (``save_tensors_data``) and passed as ``calibration_cache_path``, so ORT
    runs no calibrator of its own. Returns (model, settings)."""
    import tempfile

    try:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, TensorsData,
                                              quantize_static, save_tensors_data)
        from onnxruntime.quantization.calibrate import TensorData
    except ImportError as err:
        import onnxruntime

        raise SedeployError(f"INT8 quantization (CPU flavour) needs onnxruntime ≥ 1.32 (its quantize_static takes "
                            f"precomputed ranges as calibration_cache_path); this is onnxruntime "
                            f"{onnxruntime.__version__}.", fix="pip install -U 'onnxruntime>=1.32'") from err
    import onnx

    from sedeploy.passes import reduce_mean_to_global_pool

    if options.format not in ("qoperator", "qdq"):
        raise SedeployError(f"Unknown CPU INT8 format {options.format!r}.", expected="qoperator or qdq")
    if (default_opset(model) or 0) < MIN_OPSET:  # QLinear ops and per-channel Q/DQ need opset ≥ 13
        raise SedeployError(f"'{label}' has opset {default_opset(model)}; INT8 needs ≥ {MIN_OPSET}.",
                            fix="re-export with a newer opset (18 is the default)")
    gap = reduce_mean_to_global_pool(model) if options.squeeze_as_gap else 0
    se_nodes = _se_nodes(model) if se == "fp32" else set()
    g = Graph(model)
    # ORT's quantizer removes a quantized Clip and lets the quantization grid do the clipping: exact for a lower
    # bound of 0 (a zero point at the grid's bottom), not for other bounds, which keep their float Clip
    float_clips = {n.name for n in g.nodes if n.op_type == "Clip" and not _bounded_relu(g, n)}
    excluded = sorted(se_nodes | set(exclude) | float_clips)
    op_types = list(dict.fromkeys([*_WEIGHTED, *options.extra_ops]))
    inits = {t.name for t in model.graph.initializer}
    # every float activation read or produced by a node of a quantized op type needs a range
    acts = set(activation_tensors(model))  # float tensors computed from the image (no shape or pad vectors)
    needed = [t for n in model.graph.node if n.op_type in op_types and n.name not in excluded
              for t in (*n.input, *n.output) if t and t not in inits and t in acts]
    _check_ranges(model, calibration, [t for t in needed if t in _all_activations(model)], label)
    # uint8 activations here (int8 only where a tensor has negative values): a non-negative tensor's mse threshold
    # is the one for the uint8 grid
    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in calibration.ranges_for("uint8").items()}
    fmt = QuantFormat.QOperator if options.format == "qoperator" else QuantFormat.QDQ
    extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
    signed = []
    if options.signed_activations:
        if fmt != QuantFormat.QDQ:
            raise SedeployError("signed_activations needs the QDQ format (QOperator kernels take one activation "
                                "type).", fix="use CpuOptions(format='qdq', signed_activations=True)")
        signed = sorted(t for t, (lo, _) in calibration.ranges.items() if lo < 0)
        extra["TensorQuantOverrides"] = {t: [{"quant_type": QuantType.QInt8, "symmetric": True}] for t in signed}
    with tempfile.TemporaryDirectory(prefix="sedeploy-int8-") as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        with _without_ort_advice():
            quantize_static(model, out, calibration_data_reader=None, calibration_cache_path=cache,
                            calibrate_method=CalibrationMethod.MinMax, quant_format=fmt,
                            op_types_to_quantize=op_types, per_channel=options.per_channel,
                            reduce_range=options.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            extra_options=extra)
        quantized = onnx.load(str(out))  # ORT saves the nodes in topological order (QDQ format too)
    settings = {"activation_type": ("int8 symmetric where a tensor has negative values, else uint8 (zero point 0 "
                                    "after ReLU), per-tensor") if signed else "uint8 asymmetric per-tensor",
                "signed_activation_tensors": len(signed), "float_clips": sorted(float_clips),
                "weight_type": "int8 symmetric " + ("per-channel" if options.per_channel else "per-tensor"),
                **options.as_dict(), "squeeze_rewritten_to_gap": gap,
                "excluded_se_nodes": len(se_nodes),
                "excluded_nodes": sorted(exclude)}
    return quantized, settings


def _bounded_relu(g: Graph, node) -> bool:
    """A Clip whose lower bound is the constant 0 (ReLU6, hard-swish's Clip(0, 6), ReLU-n): bounds as constant
    inputs (opset ≥ 11) or attributes (opset < 11); no upper bound is fine, a computed bound is not."""
    if len(node.input) > 1:  # opset ≥ 11: optional min/max inputs
        lo, hi = node.input[1], node.input[2] if len(node.input) > 2 else ""
        if not lo or not g.is_const(lo) or (hi and not g.is_const(hi)):
            return False
        low = g.const(lo)
    else:  # opset < 11 attributes, or no bounds at all
        low = attr(node, "min")
        if low is None:
            return False
        low = np.asarray(low)
    return low.size == 1 and float(low.reshape(())) == 0.0


class _DropOrtAdvice(logging.Filter):
    """Drops the "consider pre-processing" advice ``quantize_static`` logs on every call (sedeploy's graph is
    already shape-inferred and fused); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_ort_advice():
    """``quantize_static`` logs through the root logger with ``logging.warning``, which installs a root handler
    when there is none. A NullHandler (kept only for the call) prevents that, and the filter drops the advice."""
    root = logging.getLogger()
    null = logging.NullHandler() if not root.handlers else None
    advice = _DropOrtAdvice()
    if null is not None:
        root.addHandler(null)
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        if null is not None:
            root.removeHandler(null)


def _all_activations(model) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


# ------------------------------------------------------------------------------------------------------- public
def quantized_op_counts(model, *, qdq: bool = True) -> dict[str, int]:
    """Op type → nodes that compute in int8: QLinear*/QGemm/…Integer nodes, and (``qdq``: QDQ format, where a
    backend fuses DQ → op → Q into an integer kernel) float ops whose data input, and weight for Conv/Gemm, come
    through DequantizeLinear. In QOperator format a float op behind a DequantizeLinear computes in float."""
    g = Graph(model)
    counts: Counter = Counter()
    for n in g.nodes:
        if n.op_type in QDQ_OPS or n.op_type == "DynamicQuantizeLinear":
            continue
        if n.op_type in QOPERATOR_OPS:
            counts[n.op_type] += 1
        elif qdq and n.input and n.input[0] and g.made_by(n.input[0], "DequantizeLinear") and (
                n.op_type not in _WEIGHTED or g.made_by(n.input[1], "DequantizeLinear")):
            counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def weighted_layers(fp32) -> list[str]:
    """Names of the layers INT8 quantizes with a weight (Conv/Gemm with a constant weight), in graph order,
    as :func:`quantize_model` names them — what ``exclude`` takes."""
    model, _ = _load_fp32(fp32)
    g = Graph(model)
    return [n.name for n in g.nodes if n.op_type in _WEIGHTED and len(n.input) > 1
            and g.is_const(n.input[1]) and not g.is_const(n.input[0])]


def layer_macs(fp32) -> dict[str, int]:
    """Multiply-adds per image of each :func:`weighted_layers` layer: output positions (from ONNX shape inference)
    × the weight's elements per output channel × output channels, i.e. out_h·out_w·numel(weight) for a Conv and
    numel(weight) for a Gemm — what keeping the layer in float costs, up to the runtime's float/int8 speed ratio.
    Shape inference propagates constant shapes (``data_prop``); a model whose map sizes it still cannot tell is
    refused (the count would make such a layer look nearly free)."""
    onnx = _onnx()
    model, label = _load_fp32(fp32)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output)}
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for layer in weighted_layers(model):
        node = by_name[layer]
        weight = int(np.prod(inits[node.input[1]].dims))
        positions = 1
        if node.op_type == "Conv":
            dims = shapes.get(node.output[0], [])[2:]
            if not dims or not all(dims):
                raise SedeployError(f"'{label}': ONNX shape inference cannot tell the output map size of {layer}, "
                                    f"so its multiply-adds are unknown.",
                                    expected="a model whose Conv output sizes follow from its input size",
                                    fix="use --fallback-order sensitivity (needs no cost)")
            positions = int(np.prod(dims))
        out[layer] = positions * weight
    return out


def float_groups(fp32, layers: Collection[str], flavour: str) -> dict[str, list[str]]:
    """Nodes to exclude so that each weighted layer of ``layers`` computes in float from a float input. TensorRT
    flavour: the layer alone (its input Q/DQ belongs to it). CPU and OpenVINO flavours: the layer plus every
    quantized op producing its input, back to and including the previous weighted layer's output ops (in those
    forms a tensor is rounded once by its producer — hard-swish Mul, residual Add, pools, Reshape … —, so keeping
    only the layer in float would still read a rounded input). ``fp32``: the FP32 model or its path."""
    model, _ = _load_fp32(fp32)
    if flavour == "trt":
        return {layer: [layer] for layer in layers}
    g = Graph(model)
    by_name = {n.name: n for n in g.nodes}
    quantized = set(CPU_OPTIONS.extra_ops) | set(_WEIGHTED)
    groups = {}
    for layer in layers:
        group, todo = [layer], [by_name[layer].input[0]]
        while todo:
            p = g.producer.get(todo.pop())
            if p is None or p.op_type not in quantized or p.name in group:
                continue
            group.append(p.name)
            if p.op_type not in _WEIGHTED:  # a weighted producer's own input stays INT8
                todo += [i for i in p.input if i and not g.is_const(i)]
        groups[layer] = group
    return groups


def head_layers(fp32) -> list[str]:
    """The classifier head: the weighted layers (Conv/Gemm with a constant weight) that the graph's outputs read
    with no other weighted layer in between (through Softmax, Reshape, Flatten …). ``fp32``: model or path."""
    model, _ = _load_fp32(fp32)
    g = Graph(model)
    weighted = set(weighted_layers(model))
    found, seen, todo = [], set(), [o.name for o in model.graph.output]
    while todo:
        p = g.producer.get(todo.pop())
        if p is None or p.name in seen:
            continue
        seen.add(p.name)
        if p.name in weighted:
            found.append(p.name)
        elif p.op_type not in _WEIGHTED:
            todo += [i for i in p.input if i and not g.is_const(i)]
    return sorted(found)


def head_policy(flavour: str, head: str | None = None) -> str:
    """``head`` checked, or the flavour's measured default (:data:`DEFAULT_HEAD_POLICY`) when None."""
    if head is not None and head not in HEAD_POLICIES:
        raise SedeployError(f"Unknown head precision policy {head!r}.", expected=f"one of {', '.join(HEAD_POLICIES)}",
                            fix="pass head=None (the measured per-flavour default), 'float' or 'int8'")
    return DEFAULT_HEAD_POLICY[flavour] if head is None else head


def float_head_layers(fp32, flavour: str, head: str | None = None) -> list[str]:
    """The head layers that the head policy (``head``, None: the flavour's default) keeps in float: the
    :func:`head_layers` under ``"float"``, unless they are every weighted layer of the model (then they are
    quantized, or nothing would be); none under ``"int8"``."""
    if head_policy(flavour, head) != "float":
        return []
    heads = head_layers(fp32)
    return [] if set(heads) >= set(weighted_layers(fp32)) else heads


def _smoke_run(path: Path, label: str, *, fp16: bool = False) -> None:
    """Load the written file in ONNX Runtime (CPU) and run one input: a file ORT rejects is not published. ``fp16``
    (the TensorRT form, Q/DQ inside the FP16 graph): the same input also runs through
    :func:`sedeploy.fp16_verify.fp16_emulation`, since ORT's CPU provider computes the FP16 parts in FP32 and would not
    show an FP16 overflow."""
    from sedeploy.onnxcore import cpu_session
    from sedeploy.preprocess import smooth_noise

    sess = cpu_session(path)
    inp = sess.get_inputs()[0]
    size = tuple(d if isinstance(d, int) else 224 for d in inp.shape[2:4])
    x = smooth_noise(1, size, seed=1)
    out = run_model(sess, x)
    if not np.all(np.isfinite(out)):
        raise SedeployError(f"The INT8 model of '{label}' produced non-finite outputs.", fix="recalibrate")
    if fp16:
        from sedeploy.fp16_verify import fp16_overflows, overflow_error

        bad = fp16_overflows(path, x)  # every FP16 tensor: a QuantizeLinear after one would clip an inf to 127
        if bad:
            raise overflow_error(f"The TensorRT INT8 model of '{label}'", bad)


def quantize_model(fp32_path, calibration: CalibrationResult, out_path, *, flavour: str,
                   se: str = DEFAULT_SE_POLICY, cpu_options: CpuOptions | None = None,
                   keep_fp32: str | Collection[str] | None = None, exclude: Collection[str] = (),
                   smoke_test: bool = True, bias_correction: bool | None = None,
                   head: str | None = None) -> QuantReport:
    """Write the INT8 ``flavour`` ("trt" or "cpu") of the FP32 model ``fp32_path`` to ``out_path``.

    The activation ranges come from ``calibration`` (which must have been made on this model). ``se`` keeps the SE
    path in float ("fp32") or quantizes it ("int8"). ``cpu_options`` overrides :data:`CPU_OPTIONS` (benchmarks).
    ``keep_fp32`` (TensorRT flavour): the FP16 keep-FP32 policy (:func:`sedeploy.fp16.parse_keep_fp32`; None: the
    FP16 artifact's default), applied exactly as to ``.fp16.onnx``. ``exclude``: node names (of the FP32 model, as
    :func:`~sedeploy.onnxcore.name_nodes` names them) kept in higher precision — in the TensorRT flavour an
    excluded Conv/Gemm/Add gets no Q/DQ and stays FP16; in the CPU flavour ORT's quantizer leaves it float.
    ``bias_correction`` corrects each quantized layer's bias for the mean shift its weight quantization causes
    (needs the calibration's channel means; the number of corrected layers is in ``settings``); None: the
    measured per-flavour default :data:`DEFAULT_BIAS_CORRECTION`. ``head``: ``"float"`` keeps the classifier head
    (:func:`head_layers`, with the ops that round its input in the CPU/OpenVINO forms) in the graph's float type,
    ``"int8"`` quantizes it; None: the flavour's measured default :data:`DEFAULT_HEAD_POLICY`.
    The file is checked with ``onnx.checker`` (full check), the TensorRT flavour also with the strong-typing check,
    loaded and run once in ONNX Runtime, and only then renamed into place; on any failure nothing is left at
    ``out_path``.
    """
    t0 = time.perf_counter()
    if flavour not in FLAVOURS:
        raise SedeployError(f"Unknown INT8 flavour {flavour!r}.", expected=f"one of {', '.join(FLAVOURS)}",
                            fix="pass flavour='trt' (TensorRT Q/DQ), 'cpu' (fastest on ONNX Runtime CPU) or 'ov' "
                                "(OpenVINO)")
    if se not in SE_POLICIES:
        raise SedeployError(f"Unknown SE precision policy {se!r}.", expected=f"one of {', '.join(SE_POLICIES)}",
                            fix=f"pass se='{DEFAULT_SE_POLICY}' (the measured default)")
    if not isinstance(calibration, CalibrationResult):
        raise SedeployError(f"calibration must be a CalibrationResult, not {type(calibration).__name__}.",
                            fix="pass the result of sedeploy.calibration.calibrate(...)")
    if flavour == "cpu" and keep_fp32 is not None:
        raise SedeployError("keep_fp32 applies to the TensorRT flavour only (the FP16 graph it quantizes); the CPU "
                            "flavour quantizes the FP32 graph.", fix="drop keep_fp32, or use exclude= to keep nodes "
                            "in float in the CPU flavour")
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise SedeployError(f"exclude must be a collection of node names, not {exclude!r}.",
                            fix="pass e.g. exclude={'/layer1/layer1.0/conv1/Conv'}")
    head = head_policy(flavour, head)
    model, label = _load_fp32(fp32_path)
    exclude = frozenset(exclude)
    unknown = sorted(exclude - {n.name for n in model.graph.node})
    if unknown:
        raise SedeployError(f"exclude names {len(unknown)} node(s) that '{label}' does not have: {unknown[:4]}.",
                            fix="pass node names of this FP32 model (sedeploy.int8.weighted_layers lists them)")
    heads = float_head_layers(model, flavour, head)
    head_nodes = frozenset(n for group in float_groups(model, heads, flavour).values() for n in group)
    exclude = exclude | head_nodes
    src_sha = sha256_file(fp32_path, what="FP32 model") if isinstance(fp32_path, (str, Path)) else ""
    if src_sha and calibration.model_sha256 and src_sha != calibration.model_sha256:
        log.warning("The calibration was made on a model with different bytes (sha256 %s…, this one %s…); its "
                    "tensor names match, so its ranges are used.", calibration.model_sha256[:12], src_sha[:12])
    corrected = 0
    if bias_correction is None:
        bias_correction = DEFAULT_BIAS_CORRECTION[flavour]
    if bias_correction:
        skip = set(exclude) | (_se_nodes(model) if se == "fp32" else set())
        qmax = _WEIGHT_QMAX_FULL
        if flavour != "trt":  # the levels the CPU/OpenVINO options give the weights
            options = cpu_options or (OV_OPTIONS if flavour == "ov" else CPU_OPTIONS)
            qmax = _WEIGHT_QMAX_REDUCED if options.reduce_range else _WEIGHT_QMAX_FULL
        corrected = _correct_biases(model, calibration, qmax, skip)
    if flavour == "trt":
        from sedeploy.fp16 import DEFAULT_KEEP_FP32

        model, settings = _trt_quantize(model, calibration, se, label,
                                        DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32, set(exclude))
        fmt = "QDQ"
    else:
        options = cpu_options or (OV_OPTIONS if flavour == "ov" else CPU_OPTIONS)
        model, settings = _cpu_quantize(model, calibration, se, label, options, set(exclude))
        fmt = "QOperator" if options.format == "qoperator" else "QDQ"
    settings["strong_typing"] = require_strong_typing(model, label).summary()
    settings["bias_correction"] = bool(bias_correction)
    settings["bias_corrected_layers"] = corrected
    settings["head"] = {"policy": head, "layers": heads, "float_nodes": sorted(head_nodes)}
    set_metadata(model, {META.PRECISION: "int8", META.FLAVOUR: flavour, META.INT8_FORMAT: fmt, META.INT8_SE: se,
                         META.CALIBRATION_METHOD: calibration.method, META.CALIBRATION_KEY: calibration.key,
                         META.CALIBRATION_IMAGES: str(len(calibration.images))})
    counts = quantized_op_counts(model, qdq=fmt == "QDQ")
    if not counts:
        raise SedeployError(f"Quantizing '{label}' ({flavour}) quantized no operator.",
                            expected="a CNN with Conv/Gemm layers", fix="check the model is an image classifier")
    save_onnx(model, out_path, before_publish=(lambda tmp: _smoke_run(tmp, label, fp16=flavour == "trt"))
              if smoke_test else None)
    histogram = dict(Counter(n.op_type for n in model.graph.node).most_common())
    return QuantReport(path=str(out_path), flavour=flavour, se=se, format=fmt, quantized_ops=counts,
                       op_histogram=histogram,
                       calibration={"method": calibration.method, "key": calibration.key,
                                    "images": len(calibration.images)},
                       settings=settings, seconds=round(time.perf_counter() - t0, 2))
