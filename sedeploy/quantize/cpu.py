"""The CPU INT8 flavours: ONNX Runtime's ``quantize_static`` driven with sedeploy's ranges.

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
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import Graph, attr, default_opset
from sedeploy.passes import reduce_mean_to_global_pool
from sedeploy.quantize.calibration import CalibrationResult, activation_tensors
from sedeploy.quantize.source import MIN_OPSET, WEIGHTED, all_activations, check_ranges, se_nodes


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


def write_cpu(model, calibration: CalibrationResult, se: str, label: str, exclude: set[str],
              options: CpuOptions = CPU_OPTIONS, keep_fp32=None):
    """ONNX Runtime's public ``quantize_static`` (QOperator or QDQ, U8S8) driven with *our* ranges: they are written
    in ORT's own calibration-cache format (``save_tensors_data``) and passed as ``calibration_cache_path``, so ORT
    runs no calibrator of its own. ``keep_fp32`` is for the TensorRT flavour's table row only (this flavour
    quantizes the FP32 graph). Returns (model, settings)."""
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

    if options.format not in ("qoperator", "qdq"):
        raise SedeployError(f"Unknown CPU INT8 format {options.format!r}.", expected="qoperator or qdq")
    if (default_opset(model) or 0) < MIN_OPSET:  # QLinear ops and per-channel Q/DQ need opset ≥ 13
        raise SedeployError(f"'{label}' has opset {default_opset(model)}; INT8 needs ≥ {MIN_OPSET}.",
                            fix="re-export with a newer opset (18 is the default)")
    gap = reduce_mean_to_global_pool(model) if options.squeeze_as_gap else 0
    se_names = se_nodes(model) if se == "fp32" else set()
    g = Graph(model)
    # ORT's quantizer removes a quantized Clip and lets the quantization grid do the clipping: exact for a lower
    # bound of 0 (a zero point at the grid's bottom), not for other bounds, which keep their float Clip
    float_clips = {n.name for n in g.nodes if n.op_type == "Clip" and not _bounded_relu(g, n)}
    excluded = sorted(se_names | set(exclude) | float_clips)
    op_types = list(dict.fromkeys([*WEIGHTED, *options.extra_ops]))
    inits = {t.name for t in model.graph.initializer}
    # every float activation read or produced by a node of a quantized op type needs a range
    acts = set(activation_tensors(model))  # float tensors computed from the image (no shape or pad vectors)
    needed = [t for n in model.graph.node if n.op_type in op_types and n.name not in excluded
              for t in (*n.input, *n.output) if t and t not in inits and t in acts]
    check_ranges(model, calibration, [t for t in needed if t in all_activations(model)], label)
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
                "excluded_se_nodes": len(se_names),
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

