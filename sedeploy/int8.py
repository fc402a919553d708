"""INT8 artifacts: one :class:`~sedeploy.calibration.CalibrationResult`, two Q/DQ flavours.

Why two flavours: the runtimes that consume an INT8 ONNX disagree on what a good one looks like.

``flavour="trt"`` — what TensorRT's ONNX parser imports as explicit quantization (facts §4, checked by
    :func:`sedeploy.checks.check_trt_qdq`): QuantizeLinear/DequantizeLinear (QDQ) pairs with signed int8 and
    zero point 0 everywhere; activations per tensor (scale = amax/127, amax from the calibration); weights stored as
    int8 initializers, per output channel (Conv axis 0; Gemm axis 0 with transB=1, else 1), read through a
    DequantizeLinear; biases stay float (no int32 bias DequantizeLinear). Placement follows NVIDIA's advice: a Q/DQ
    pair on the data input of every Conv/Gemm and on the *skip* input of every residual Add (then TensorRT fuses
    the Add into the preceding convolution with an int8 output); Sigmoid, ReduceMean and pools read float. The
    Q/DQ nodes are inserted here rather than by ``onnxruntime.quantization``: its QDQ quantizer puts pairs on
    operator outputs and on both Add inputs, the opposite of what TensorRT fuses best.

``flavour="cpu"`` — what ONNX Runtime's CPU kernels run fastest on a machine without VNNI (facts §5: signed int8
    QDQ is *slower* than FP32 there): ONNX Runtime's own quantizer in QOperator format with uint8 activations and
    int8 weights (U8S8), weights with 7-bit range (``reduce_range``, avoids the int16 saturation of the AVX2
    u8×s8 multiply-add), driven with *our* ranges (a ``TensorsData`` built from the calibration, never ORT's own
    calibrators). The SE squeeze (ReduceMean over H,W) is first rewritten to the equivalent GlobalAveragePool so
    that it, the Sigmoid gate, the channel-scaling Mul and the residual Add all get com.microsoft QLinear kernels
    and activations stay uint8 from one convolution to the next. The settings are the measured optimum of
    ``benchmarks/int8_cpu_forms.py`` (see :data:`CPU_OPTIONS` and benchmarks/int8_cpu_forms.md).

``flavour="ov"`` — what OpenVINO's CPU plugin runs fastest and most faithfully (measured in
    benchmarks/results/openvino_peers/results.md): the CPU flavour's quantizer and placement (every op of :data:`CPU_OPTIONS`,
    squeeze as GlobalAveragePool) written as Q/DQ (:data:`OV_OPTIONS`), with uint8 activations, so a tensor after a
    ReLU uses all 8 bits (the TensorRT flavour's signed activations use 7 of them), and full 8-bit weights (no
    ``reduce_range``: OpenVINO's VNNI / AMX int8 kernels do not saturate). OpenVINO cannot read the QOperator CPU
    flavour at all (QLinearConv with per-channel scales and the com.microsoft QLinear ops fail to convert).

SE policy (``se``): ``"fp32"`` keeps the SE path (squeeze, both FCs, gate, scale) in float, ``"int8"`` quantizes it
like the rest. :data:`DEFAULT_SE_POLICY` is chosen from measured drift and speed (benchmarks/int8_cpu_forms.md).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy.calibration import CalibrationResult
from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.onnxcore import (META, QDQ_OPS, QOPERATOR_OPS, Graph, compute_depths, copy_model, default_opset,
                               get_metadata, image_input, is_quantized, name_nodes, run_model, save_onnx, set_metadata,
                               sha256_file)

log = logging.getLogger("sedeploy")

FLAVOURS = ("trt", "cpu", "ov")
SE_POLICIES = ("fp32", "int8")
#: Chosen by benchmarks/int8_cpu_forms.py on the trained reference SE-ResNet-50 (Imagenette val, 3,925 images):
#: quantizing SE runs 1.97× FP32 at batch 8 against 1.60× with SE in FP32, for 97.9 % vs 98.1 % top-1 agreement
#: and equal top-1 — 0.2 pt of agreement is not worth 19 % of the speed.
DEFAULT_SE_POLICY = "int8"
MIN_OPSET = 13  # per-channel (axis) Q/DQ
_INT8_MAX = 127.0
_SMALLEST_SCALE = 1e-12  # an all-zero tensor/channel still needs a positive scale
_WEIGHTED = ("Conv", "Gemm")
_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU flavour is quantized (the fields benchmarks/int8_cpu_forms.py explores)."""

    format: str = "qoperator"  # "qoperator" (QLinearConv …) or "qdq" (ORT fuses QDQ groups at session creation)
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: no u8×s8 int16 saturation on AVX2 without VNNI
    #: op types quantized besides Conv/Gemm; their QLinear kernels keep activations uint8 between layers
    extra_ops: tuple[str, ...] = ("Add", "Mul", "Sigmoid", "GlobalAveragePool", "Relu", "MaxPool", "Reshape",
                                  "Flatten")
    squeeze_as_gap: bool = True  # rewrite ReduceMean(H,W) to GlobalAveragePool (QLinearGlobalAveragePool exists)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["extra_ops"] = list(self.extra_ops)
        return d


#: Measured (benchmarks/int8_cpu_forms.md, trained reference): 1.97× FP32 at batch 8, 97.9 % top-1 agreement —
#: as fast as any form and within 0.5 pt of the most faithful one (conv-only, 98.4 %, 1.59×).
CPU_OPTIONS = CpuOptions()
#: The OpenVINO flavour: the CPU flavour's ops as Q/DQ, full 8-bit weights. Measured interleaved with OpenVINO +
#: NNCF INT8 (benchmarks/results/openvino_peers/results.md): SE-ResNet-50/101 0.82–1.01× NNCF's speed (a loaded
#: machine), 1.3–1.8× the int8-trt artifact on OpenVINO; tiny trained model 99.6 % top-1 agreement vs NNCF's 98.4 %.
OV_OPTIONS = CpuOptions(format="qdq", reduce_range=False)


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
    return model, label


def _se_nodes(model) -> set[str]:
    """Names of every SE block's nodes, from the one SE recogniser."""
    from sedeploy.passes import se_block_nodes

    return {name for block in se_block_nodes(model) for name in block.all}


def _check_ranges(model, calibration: CalibrationResult, tensors: list[str], label: str) -> None:
    missing = [t for t in dict.fromkeys(tensors) if t not in calibration.ranges]
    if missing:
        raise SedeployError(
            f"The calibration (method {calibration.method}, key {calibration.key[:12]}…) has no range for "
            f"{len(missing)} activation(s) of '{label}', e.g. {missing[:4]}: it was made for another model.",
            expected="a calibration of this very FP32 model (sedeploy.calibration.calibrate on the same .onnx)",
            fix="calibrate this model (or pass --calib-cache pointing at its own cache file)")
    bad = [t for t in tensors if not all(np.isfinite(calibration.ranges[t]))]
    if bad:
        raise SedeployError(f"Calibration ranges of {bad[:4]} are not finite.", fix="recalibrate")


def _float_activation(model, name: str, inits: set[str]) -> bool:
    return bool(name) and name not in inits


# ------------------------------------------------------------------------------------------------- TRT flavour
def _trt_quantize(model, calibration: CalibrationResult, se: str, label: str) -> dict:
    """Insert TensorRT-style Q/DQ (see module docstring); returns settings for the report."""
    from onnx import helper, numpy_helper

    if default_opset(model) < MIN_OPSET:
        raise SedeployError(f"'{label}' has opset {default_opset(model)}; TensorRT's per-channel Q/DQ needs ≥ {MIN_OPSET}.",
                            fix="re-export with --opset 13 or newer (18 is the default)")
    g = Graph(model)
    skip_se = _se_nodes(model) if se == "fp32" else set()
    weighted = [n for n in g.nodes if n.op_type in _WEIGHTED and n.name not in skip_se and len(n.input) > 1
                and g.is_const(n.input[1]) and not g.is_const(n.input[0])]
    depth = compute_depths(g)
    act_uses: dict[str, list[tuple]] = {}  # tensor → [(node, input index)] to rewire to its DQ output
    for n in weighted:
        act_uses.setdefault(n.input[0], []).append((n, 0))
    for n in g.nodes:
        if n.op_type == "Add" and len(n.input) == 2 and not any(g.is_const(i) for i in n.input):
            skip = min((0, 1), key=lambda k: depth.get(n.input[k], 0))
            act_uses.setdefault(n.input[skip], []).append((n, skip))
    _check_ranges(model, calibration, list(act_uses), label)

    new_nodes: dict[str, list] = {}  # producer output (or "" for graph input) → Q/DQ nodes to insert after it
    new_inits = []
    zp8 = "sedeploy_zp_int8"
    new_inits.append(numpy_helper.from_array(np.zeros((), np.int8), zp8))
    for t, uses in act_uses.items():
        scale = max(calibration.amax(t) / _INT8_MAX, _SMALLEST_SCALE)
        s_name, q_out, dq_out = f"{t}_scale", f"{t}_QuantizeLinear", f"{t}_DequantizeLinear"
        new_inits.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
        nodes = [helper.make_node("QuantizeLinear", [t, s_name, zp8], [q_out], name=f"{t}_Q"),
                 helper.make_node("DequantizeLinear", [q_out, s_name, zp8], [dq_out], name=f"{t}_DQ")]
        new_nodes.setdefault(t, []).extend(nodes)
        for node, k in uses:
            node.input[k] = dq_out
    for n in weighted:
        w_name = n.input[1]
        w = g.const(w_name).astype(np.float32)
        axis = 0 if n.op_type == "Conv" or _attr(n, "transB", 0) else 1
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        scale = np.maximum(amax / _INT8_MAX, _SMALLEST_SCALE).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        wq = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        base = f"{w_name}_{n.name}"
        new_inits += [numpy_helper.from_array(wq, f"{base}_int8"),
                      numpy_helper.from_array(scale, f"{base}_scale"),
                      numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{base}_zp")]
        dq = helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_scale", f"{base}_zp"],
                              [f"{base}_DequantizeLinear"], name=f"{base}_DQ", axis=axis)
        new_nodes.setdefault(f"__before__{n.name}", []).append(dq)
        n.input[1] = dq.output[0]
    # Rebuild the node list in topological order: Q/DQ right after their tensor's producer, weight DQs right
    # before their consumer.
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
    return {"activation_type": "int8 symmetric per-tensor", "weight_type": "int8 symmetric per-channel",
            "bias": "float", "activation_qdq": len(act_uses), "weight_dq": len(weighted),
            "excluded_se_nodes": len(skip_se)}


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ------------------------------------------------------------------------------------------------- CPU flavour
def _cpu_quantize(model, calibration: CalibrationResult, se: str, label: str, options: CpuOptions):
    """ONNX Runtime's public ``quantize_static`` (QOperator or QDQ, U8S8) driven with *our* ranges: they are written
    in ORT's own calibration-cache format (``save_tensors_data``) and passed as ``calibration_cache_path``, so ORT
    runs no calibrator of its own. Returns (model, settings)."""
    import tempfile

    try:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, TensorsData,
                                              quantize_static, save_tensors_data)
        from onnxruntime.quantization.calibrate import TensorData
    except ImportError as err:
        raise MissingDependencyError("onnxruntime", "ort", "INT8 quantization (CPU flavour)") from err
    import onnx

    from sedeploy.passes import reduce_mean_to_global_pool

    if options.format not in ("qoperator", "qdq"):
        raise SedeployError(f"Unknown CPU INT8 format {options.format!r}.", expected="qoperator or qdq")
    if default_opset(model) < MIN_OPSET:  # QLinear ops and per-channel Q/DQ need opset ≥ 13
        raise SedeployError(f"'{label}' has opset {default_opset(model)}; INT8 needs ≥ {MIN_OPSET}.",
                            fix="re-export with a newer opset (18 is the default)")
    gap = reduce_mean_to_global_pool(model) if options.squeeze_as_gap else 0
    excluded = sorted(_se_nodes(model)) if se == "fp32" else []
    op_types = list(dict.fromkeys([*_WEIGHTED, *options.extra_ops]))
    inits = {t.name for t in model.graph.initializer}
    # every float activation read or produced by a node of a quantized op type needs a range
    needed = [t for n in model.graph.node if n.op_type in op_types and n.name not in excluded
              for t in (*n.input, *n.output) if _float_activation(model, t, inits)]
    _check_ranges(model, calibration, [t for t in needed if t in _all_activations(model)], label)
    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in calibration.ranges.items()}
    fmt = QuantFormat.QOperator if options.format == "qoperator" else QuantFormat.QDQ
    with tempfile.TemporaryDirectory(prefix="sedeploy-int8-") as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        with _quiet_root_logger():  # ORT logs "consider pre-processing" on the root logger for every call
            quantize_static(model, out, calibration_data_reader=None, calibration_cache_path=cache,
                            calibrate_method=CalibrationMethod.MinMax, quant_format=fmt,
                            op_types_to_quantize=op_types, per_channel=options.per_channel,
                            reduce_range=options.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        quantized = onnx.load(str(out))
    if fmt == QuantFormat.QDQ:  # the QDQ quantizer appends its nodes at the end of the graph
        quantized = _topological(quantized)
    settings = {"activation_type": "uint8 asymmetric per-tensor",
                "weight_type": "int8 symmetric " + ("per-channel" if options.per_channel else "per-tensor"),
                **options.as_dict(), "squeeze_rewritten_to_gap": gap, "excluded_se_nodes": len(excluded)}
    return quantized, settings


class _quiet_root_logger:
    def __enter__(self):
        import logging as _logging

        self.logger, self.level = _logging.getLogger(), _logging.getLogger().level
        self.logger.setLevel(_logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _topological(model):
    import onnx_ir as ir

    m = ir.serde.deserialize_model(model)
    m.graph.sort()
    return ir.serde.serialize_model(m)


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
        if n.op_type in _QUANT_OPS:
            continue
        if n.op_type.startswith("QLinear") or n.op_type in ("QGemm", "QAttention") or n.op_type.endswith("Integer"):
            counts[n.op_type] += 1
        elif qdq and n.input and n.input[0] and g.made_by(n.input[0], "DequantizeLinear") and (
                n.op_type not in _WEIGHTED or g.made_by(n.input[1], "DequantizeLinear")):
            counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def _smoke_run(path: Path, label: str) -> None:
    """Load the written file in ONNX Runtime (CPU) and run one input: a file ORT rejects is not published."""
    from sedeploy.onnxcore import cpu_session
    from sedeploy.preprocess import smooth_noise

    sess = cpu_session(path)
    inp = sess.get_inputs()[0]
    size = inp.shape[2] if isinstance(inp.shape[2], int) else 224
    out = run_model(sess, smooth_noise(1, size, seed=1))
    if not np.all(np.isfinite(out)):
        raise SedeployError(f"The INT8 model of '{label}' produced non-finite outputs.", fix="recalibrate")


def quantize_model(fp32_path, calibration: CalibrationResult, out_path, *, flavour: str,
                   se: str = DEFAULT_SE_POLICY, cpu_options: CpuOptions | None = None,
                   smoke_test: bool = True) -> QuantReport:
    """Write the INT8 ``flavour`` ("trt" or "cpu") of the FP32 model ``fp32_path`` to ``out_path``.

    The activation ranges come from ``calibration`` (which must have been made on this model). ``se`` keeps the SE
    path in float ("fp32") or quantizes it ("int8"). ``cpu_options`` overrides :data:`CPU_OPTIONS` (benchmarks).
    The file is checked with ``onnx.checker`` (full check), loaded and run once in ONNX Runtime, and only then
    renamed into place; on any failure nothing is left at ``out_path``.
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
    model, label = _load_fp32(fp32_path)
    src_sha = sha256_file(fp32_path, what="FP32 model") if isinstance(fp32_path, (str, Path)) else ""
    if src_sha and calibration.model_sha256 and src_sha != calibration.model_sha256:
        log.warning("The calibration was made on a model with different bytes (sha256 %s…, this one %s…); its "
                    "tensor names match, so its ranges are used.", calibration.model_sha256[:12], src_sha[:12])
    if flavour == "trt":
        settings = _trt_quantize(model, calibration, se, label)
        fmt = "QDQ"
    else:
        options = cpu_options or (OV_OPTIONS if flavour == "ov" else CPU_OPTIONS)
        model, settings = _cpu_quantize(model, calibration, se, label, options)
        fmt = "QOperator" if options.format == "qoperator" else "QDQ"
    set_metadata(model, {META.PRECISION: "int8", META.FLAVOUR: flavour, META.INT8_FORMAT: fmt, META.INT8_SE: se,
                         META.CALIBRATION_METHOD: calibration.method, META.CALIBRATION_KEY: calibration.key,
                         META.CALIBRATION_IMAGES: str(len(calibration.images))})
    counts = quantized_op_counts(model, qdq=fmt == "QDQ")
    if not counts:
        raise SedeployError(f"Quantizing '{label}' ({flavour}) quantized no operator.",
                            expected="a CNN with Conv/Gemm layers", fix="check the model is an image classifier")
    save_onnx(model, out_path, before_publish=(lambda tmp: _smoke_run(tmp, label)) if smoke_test else None)
    histogram = dict(Counter(n.op_type for n in model.graph.node).most_common())
    return QuantReport(path=str(out_path), flavour=flavour, se=se, format=fmt, quantized_ops=counts,
                       op_histogram=histogram,
                       calibration={"method": calibration.method, "key": calibration.key,
                                    "images": len(calibration.images)},
                       settings=settings, seconds=round(time.perf_counter() - t0, 2))
