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
    NNCF's choice), and 7-bit weights where a layer's input fills the 8-bit grid (the image, a ReLU6 output, a
    signed tensor; :func:`seven_bit_layers`): on a CPU without VNNI (AVX2) OpenVINO's int8 kernels sum pairs of
    uint8·int8 products in int16, which full 8-bit weights overflow on such inputs — SqueezeNet 1.1 then loses 25
    points of top-1 agreement that it keeps on a VNNI/AMX CPU (benchmarks/results/zoo_int8/); after a plain ReLU
    the values sit near zero and full 8-bit weights are safe and more faithful. Other SE placements (NNCF's float excitation, squeeze-first) were measured and are not faster
    (benchmarks/results/ov_se_forms/). OpenVINO cannot read the QOperator CPU
    flavour at all (QLinearConv with per-channel scales and the com.microsoft QLinear ops fail to convert).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import Graph, attr, default_opset
from sedeploy.passes import reduce_mean_to_global_pool
from sedeploy.quantize.calibration import CalibrationResult, activation_tensors
from sedeploy.quantize.source import MIN_OPSET, WEIGHTED, all_activations, check_ranges, se_nodes


#: the values of :attr:`CpuOptions.reduce_range`
REDUCE_RANGE_SCOPES = ("all", "none", "dense-inputs")


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU flavour is quantized (the fields benchmarks/experiments/int8_cpu_forms.py explores)."""

    format: str = "qoperator"  # "qoperator" (QLinearConv …) or "qdq" (ORT fuses QDQ groups at session creation)
    per_channel: bool = True
    #: which weighted layers get 7-bit weights (ORT's ``reduce_range``): ``"all"``, ``"none"`` or
    #: ``"dense-inputs"`` (:func:`seven_bit_layers`). 7 bits rule out the int16 saturation of the u8×s8
    #: multiply-add of a CPU without VNNI (AVX2); True / False are read as "all" / "none".
    reduce_range: str | bool = "all"
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
    #: QDQ only: every Concat quantized, its inputs and output on one shared range (:func:`unify_concat_ranges`) so
    #: that the runtime concatenates int8 tensors as they are (NNCF's unified scales); False: each tensor on its
    #: own range and the Concat in float
    unify_concat: bool = False

    def __post_init__(self):
        if isinstance(self.reduce_range, bool):
            object.__setattr__(self, "reduce_range", "all" if self.reduce_range else "none")
        if self.reduce_range not in REDUCE_RANGE_SCOPES:
            raise SedeployError(f"CpuOptions.reduce_range {self.reduce_range!r} is not valid.",
                                expected=" or ".join(REDUCE_RANGE_SCOPES))
        if self.unify_concat and self.format != "qdq":
            raise SedeployError("CpuOptions.unify_concat needs the QDQ format.", fix="use format='qdq'")
        if self.reduce_range == "dense-inputs" and self.format != "qdq":
            raise SedeployError("CpuOptions.reduce_range='dense-inputs' needs the QDQ format (per-layer weight "
                                "ranges are set through QDQ overrides).",
                                fix="use format='qdq', or reduce_range 'all' / 'none'")

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
#: ``reduce_range="dense-inputs"`` (7-bit weights only where a layer's input fills the 8-bit grid,
#: :func:`seven_bit_layers`): on a CPU without VNNI (AVX2) OpenVINO's int8 kernels sum pairs of uint8·int8 products
#: in int16, which full 8-bit weights overflow on such inputs — 8-bit weights everywhere lose 25 points of top-1
#: agreement on SqueezeNet 1.1 under AVX2 that they keep on a VNNI/AMX CPU —, while 7 bits everywhere cost up to
#: 1.6 points on every CPU. Measured (64 calibration images, agreement with FP32 on held-out imagenet-val-1300
#: images, OpenVINO 2026.4 on an AMX Xeon and on the same Xeon with ONEDNN_MAX_CPU_ISA=AVX2; results in
#: benchmarks/results/zoo_int8/): see :data:`OV_OPTIONS_MEASURED`.
OV_OPTIONS = CpuOptions(format="qdq", reduce_range="dense-inputs", signed_activations=True, unify_concat=True,
                        extra_ops=(*CPU_OPTIONS.extra_ops, "Concat"))
#: ``unify_concat`` (SqueezeNet 1.1, 400 held-out images, OpenVINO 2026.4 on 2 threads of an AMX Xeon, timed
#: interleaved with OpenVINO + NNCF INT8): each Concat input on its own range leaves OpenVINO a requantizing float
#: Concat, 0.91× / 0.80× NNCF's speed at batch 1 / 8 with 97.75 % agreement; quantized Concats on one shared
#: range 1.12× / 1.03× with 97.25 % (NNCF 95.50 %). Networks without a Concat are not affected.
#: the measurement behind :data:`OV_OPTIONS`' ``reduce_range`` (AMX / AVX2 top-1 agreement with FP32, %; 400
#: held-out images for the zoo models, 300 for SE-ResNet-50 with random weights)
OV_OPTIONS_MEASURED = {
    "SqueezeNet 1.1": {"all": (96.75, 96.00), "none": (97.00, 74.25), "dense-inputs": (97.75, 97.75)},
    "MobileNet-V1 0.25 (every input after ReLU6: dense-inputs is all)": {"all": (90.00, 90.50),
                                                                          "none": (89.25, 84.25)},
    "SE-ResNet-50, random weights": {"all": (88.67, 88.67), "none": (89.00, 84.33), "dense-inputs": (90.00, 88.67)},
}


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
    seven = seven_bit_layers(model, calibration, options.reduce_range)
    overrides = {}
    if options.reduce_range == "dense-inputs":
        # an override without "axis" would make ORT quantize that weight per tensor: give the axis it would use
        overrides = {n.input[1]: [{"reduce_range": n.name in seven,
                                   **({"axis": _weight_axis(n)} if options.per_channel else {})}]
                     for n in model.graph.node if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits}
    if options.signed_activations:
        if fmt != QuantFormat.QDQ:
            raise SedeployError("signed_activations needs the QDQ format (QOperator kernels take one activation "
                                "type).", fix="use CpuOptions(format='qdq', signed_activations=True)")
        signed = sorted(t for t, (lo, _) in calibration.ranges.items() if lo < 0)
        overrides.update({t: [{"quant_type": QuantType.QInt8, "symmetric": True}] for t in signed})
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    with tempfile.TemporaryDirectory(prefix="sedeploy-int8-") as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        with _without_ort_advice():
            quantize_static(model, out, calibration_data_reader=None, calibration_cache_path=cache,
                            calibrate_method=CalibrationMethod.MinMax, quant_format=fmt,
                            op_types_to_quantize=op_types, per_channel=options.per_channel,
                            reduce_range=options.reduce_range == "all", activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            extra_options=extra)
        quantized = onnx.load(str(out))  # ORT saves the nodes in topological order (QDQ format too)
    settings = {"activation_type": ("int8 symmetric where a tensor has negative values, else uint8 (zero point 0 "
                                    "after ReLU), per-tensor") if signed else "uint8 asymmetric per-tensor",
                "signed_activation_tensors": len(signed), "float_clips": sorted(float_clips),
                "weight_type": "int8 symmetric " + ("per-channel" if options.per_channel else "per-tensor"),
                **options.as_dict(), "seven_bit_weight_layers": len(seven), "squeeze_rewritten_to_gap": gap,
                "excluded_se_nodes": len(se_names),
                "excluded_nodes": sorted(exclude)}
    return quantized, settings


def unify_concat_ranges(model, calibration: CalibrationResult) -> CalibrationResult:
    """``calibration`` with every Concat's inputs and output on one range, the union of theirs (tensors joined by
    several Concats share one range across all of them); a Concat that reads a model input keeps its ranges (other
    readers of that input would change). Other ranges are kept; the calibration itself is not changed."""
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.setdefault(t, t) != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    graph_inputs = {i.name for i in model.graph.input}  # other readers of a model input keep its own range
    for n in model.graph.node:
        if n.op_type == "Concat" and not graph_inputs & set(n.input):
            tensors = [t for t in (*n.input, *n.output) if t in calibration.ranges]
            for t in tensors[1:]:
                parent[find(t)] = find(tensors[0])
    groups: dict[str, list[str]] = {}
    for t in parent:
        groups.setdefault(find(t), []).append(t)

    def unified(table: dict) -> dict:
        out = dict(table)
        for members in groups.values():
            known = [table[t] for t in members if t in table]
            if len(known) > 1:
                span = (min(lo for lo, _ in known), max(hi for _, hi in known))
                out.update({t: span for t in members if t in table})
        return out

    return replace(calibration, ranges=unified(calibration.ranges),
                   uint8_ranges=unified({**calibration.ranges, **calibration.uint8_ranges}))


def seven_bit_layers(model, calibration: CalibrationResult, scope: str) -> set[str]:
    """The weighted layers (node names) that get 7-bit weights under ``scope`` (:data:`REDUCE_RANGE_SCOPES`).

    ``"dense-inputs"``: the layers whose input fills the 8-bit grid, where a CPU without VNNI saturates the int16
    sum of two uint8·int8 products — the layers fed by the model's input (an image uses every level; nothing
    weighted lies between), by a bounded activation (ReLU6, hard-swish's Clip(0, 6): its values pile up at the top
    of the grid) and by a tensor with negative values (int8, shifted by 128 for the uint8 kernels, or a
    zero-point-centred uint8: every product is large). A ReLU's long tail sets its range, so its values sit near
    zero and those layers keep full 8-bit weights."""
    g = Graph(model)
    weighted = [n for n in g.nodes if n.op_type in WEIGHTED]
    if scope == "all":
        return {n.name for n in weighted}
    if scope == "none":
        return set()
    # an image uses every level; a bounded activation (ReLU6, hard-swish's Clip) piles its values at the top of the
    # grid; a tensor with negative values is centred on the grid (int8 is shifted by 128 for the u8 kernels)
    inits = {t.name for t in model.graph.initializer}  # an old-IR graph also lists its initializers as inputs
    dense = _reached_before_weights(g, {i.name for i in model.graph.input if i.name not in inits}
                                    | {n.output[0] for n in g.nodes if n.op_type == "Clip" and _bounded_relu(g, n)
                                       and _has_upper_bound(n)})
    signed = {t for t, (lo, _) in calibration.ranges.items() if lo < 0}
    seven = {n.name for n in weighted if n.input[0] in dense or n.input[0] in signed}
    # one weight tensor is quantized once: shared by several layers, it gets 7 bits if any of them needs them
    shared = {n.input[1] for n in weighted if n.name in seven and len(n.input) > 1}
    return seven | {n.name for n in weighted if len(n.input) > 1 and n.input[1] in shared}


def _weight_axis(node) -> int:
    """The output-channel axis of a Conv or Gemm weight, as ONNX Runtime's quantizer takes it per channel."""
    if node.op_type == "Conv":
        return 0
    return 0 if attr(node, "transB", 0) else 1


def _reached_before_weights(g: Graph, sources: set[str]) -> set[str]:
    """``sources`` and the tensors computed from them through no weighted layer."""
    reached = set(sources)
    for n in g.nodes:  # topological order
        if n.op_type not in WEIGHTED and any(i in reached for i in n.input):
            reached.update(o for o in n.output if o)
    return reached


def _has_upper_bound(node) -> bool:
    """A Clip given a maximum (as an input, opset ≥ 11, or an attribute)."""
    return bool(len(node.input) > 2 and node.input[2]) or attr(node, "max") is not None


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

