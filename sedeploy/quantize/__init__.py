"""INT8: one calibration (:mod:`sedeploy.quantize.calibration`), several Q/DQ flavours (:data:`FLAVOURS`).

Why several flavours: the runtimes that consume an INT8 ONNX disagree on what a good one looks like. Each row of
:data:`FLAVOURS` names one, says what it is for, and holds the function that writes it and its options:
``trt`` (:mod:`sedeploy.quantize.trt`, Q/DQ inside the FP16 graph), ``cpu`` and ``ov``
(:mod:`sedeploy.quantize.cpu`, ONNX Runtime's quantizer driven with sedeploy's ranges, QOperator and Q/DQ).
What stays in float (SE path, classifier head, the accuracy budget's layers) is :mod:`sedeploy.quantize.policies`;
bias correction :mod:`sedeploy.quantize.bias`.

SE policy (``se``): ``"fp32"`` keeps the SE path (squeeze, both FCs, gate, scale) in float — in the TensorRT
flavour that is the FP16 graph's float16 unless the keep-FP32 policy says otherwise —, ``"int8"`` quantizes it
like the rest. :data:`DEFAULT_SE_POLICY` is chosen from measured drift and speed (benchmarks/results/int8_cpu_forms/results.md).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy.checks.strong_typing import require_strong_typing
from sedeploy.errors import SedeployError
from sedeploy.fp16_verify import fp16_overflows, overflow_error
from sedeploy.onnxcore import META, copy_model, cpu_session, run_model, save_onnx, set_metadata, sha256_file
from sedeploy.preprocess import smooth_noise
from sedeploy.quantize.bias import DEFAULT_BIAS_CORRECTION, WEIGHT_QMAX_FULL, WEIGHT_QMAX_REDUCED, correct_biases
from sedeploy.quantize.calibration import (CACHE_FORMAT, CALIBRATION_VERSION, DEFAULT_BATCH_SIZE, DEFAULT_COUNT,
                                           DEFAULT_METHOD, GRIDS, MIN_IMAGES, CalibrationResult, activation_tensors,
                                           calibrate, calibration_key, default_cache_dir, select_images)
from sedeploy.quantize.cpu import (CPU_OPTIONS, OV_OPTIONS, REDUCE_RANGE_SCOPES, CpuOptions, seven_bit_layers,
                                   unify_concat_ranges, write_cpu)
from sedeploy.quantize.measured_bias import MEASURED_BIAS_IMAGES, calibration_images, correct_biases_measured
from sedeploy.quantize.estimators import (DEFAULT_PERCENTILE, HIST_BINS, METHODS, QUANT_BINS, entropy_amax,
                                          method_params, mse_amax, percentile_amax)
from sedeploy.quantize.policies import (DEFAULT_HEAD_POLICY, DEFAULT_SE_POLICY, FLOAT_HEAD_MAX_MACS_SHARE,
                                        HEAD_POLICIES, SE_POLICIES,
                                        float_groups, float_head_layers, head_layers, head_policy, layer_macs,
                                        quantized_op_counts, weighted_layers)
from sedeploy.quantize.source import MIN_OPSET, load_fp32, se_nodes
from sedeploy.quantize.trt import FP16_MIN_NORMAL, TRT_OPSET, write_trt

log = logging.getLogger("sedeploy")


@dataclass(frozen=True)
class Flavour:
    """One INT8 form: its name (``flavour=``, the artifact's ``int8-<name>`` suffix), what it is for, the function
    that writes it (``write(model, calibration, se, label, exclude, options, keep_fp32) → (model, settings)``) and
    its default options (:class:`CpuOptions`; None: the TensorRT flavour, which quantizes the FP16 graph)."""

    name: str
    purpose: str
    write: Callable
    options: CpuOptions | None = None

    @property
    def fp16_graph(self) -> bool:
        """Q/DQ inside the FP16 graph (the smoke run then also checks FP16 overflow)."""
        return self.options is None


FLAVOURS: dict[str, Flavour] = {f.name: f for f in (
    Flavour("trt", "TensorRT: symmetric Q/DQ inside the FP16 graph, as its strongly typed parser wants", write_trt),
    Flavour("cpu", "ONNX Runtime CPU: QOperator U8S8 with 7-bit weights, fastest without VNNI", write_cpu,
            CPU_OPTIONS),
    Flavour("ov", "OpenVINO CPU: Q/DQ, int8 where negative and uint8 after ReLU, 7-bit weights on dense inputs",
            write_cpu,
            OV_OPTIONS),
)}

__all__ = [
    "CACHE_FORMAT", "CALIBRATION_VERSION", "CPU_OPTIONS", "DEFAULT_BATCH_SIZE", "DEFAULT_BIAS_CORRECTION",
    "DEFAULT_COUNT", "DEFAULT_HEAD_POLICY", "DEFAULT_METHOD", "DEFAULT_PERCENTILE", "DEFAULT_SE_POLICY",
    "FLAVOURS", "FLOAT_HEAD_MAX_MACS_SHARE", "FP16_MIN_NORMAL", "GRIDS", "HEAD_POLICIES", "HIST_BINS", "METHODS",
    "MEASURED_BIAS_IMAGES", "MIN_IMAGES", "MIN_OPSET",
    "OV_OPTIONS", "QUANT_BINS", "REDUCE_RANGE_SCOPES", "SE_POLICIES", "TRT_OPSET", "CalibrationResult", "CpuOptions", "Flavour",
    "QuantReport", "activation_tensors", "calibrate", "calibration_key", "default_cache_dir", "entropy_amax",
    "float_groups", "float_head_layers", "head_layers", "head_policy", "layer_macs", "method_params", "mse_amax",
    "percentile_amax", "quantize_model", "quantized_op_counts", "select_images", "seven_bit_layers", "smoke_run",
    "unify_concat_ranges", "weighted_layers",
]


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


def smoke_run(path: Path, label: str, *, fp16: bool = False) -> None:
    """Load the written file in ONNX Runtime (CPU) and run one input: a file ORT rejects is not published. ``fp16``
    (the TensorRT form, Q/DQ inside the FP16 graph): the same input also runs through
    :func:`sedeploy.fp16_verify.fp16_emulation`, since ORT's CPU provider computes the FP16 parts in FP32 and would not
    show an FP16 overflow."""
    sess = cpu_session(path)
    inp = sess.get_inputs()[0]
    size = tuple(d if isinstance(d, int) else 224 for d in inp.shape[2:4])
    x = smooth_noise(1, size, seed=1)
    out = run_model(sess, x)
    if not np.all(np.isfinite(out)):
        raise SedeployError(f"The INT8 model of '{label}' produced non-finite outputs.", fix="recalibrate")
    if fp16:
        bad = fp16_overflows(path, x)  # every FP16 tensor: a QuantizeLinear after one would clip an inf to 127
        if bad:
            raise overflow_error(f"The TensorRT INT8 model of '{label}'", bad)


def _check_request(flavour: str, se: str, calibration, keep_fp32, exclude) -> Flavour:
    """The flavour's row, once the arguments of :func:`quantize_model` that need no model are valid."""
    if flavour not in FLAVOURS:
        raise SedeployError(f"Unknown INT8 flavour {flavour!r}.", expected=f"one of {', '.join(FLAVOURS)}",
                            fix="pass flavour='trt' (TensorRT Q/DQ), 'cpu' (fastest on ONNX Runtime CPU) or 'ov' "
                                "(OpenVINO)")
    if se not in SE_POLICIES:
        raise SedeployError(f"Unknown SE precision policy {se!r}.", expected=f"one of {', '.join(SE_POLICIES)}",
                            fix=f"pass se='{DEFAULT_SE_POLICY}' (the measured default)")
    if not isinstance(calibration, CalibrationResult):
        raise SedeployError(f"calibration must be a CalibrationResult, not {type(calibration).__name__}.",
                            fix="pass the result of sedeploy.quantize.calibrate(...)")
    if flavour == "cpu" and keep_fp32 is not None:
        raise SedeployError("keep_fp32 applies to the TensorRT flavour only (the FP16 graph it quantizes); the CPU "
                            "flavour quantizes the FP32 graph.", fix="drop keep_fp32, or use exclude= to keep nodes "
                            "in float in the CPU flavour")
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise SedeployError(f"exclude must be a collection of node names, not {exclude!r}.",
                            fix="pass e.g. exclude={'/layer1/layer1.0/conv1/Conv'}")
    return FLAVOURS[flavour]


def quantize_model(fp32_path, calibration: CalibrationResult, out_path, *, flavour: str,
                   se: str = DEFAULT_SE_POLICY, cpu_options: CpuOptions | None = None,
                   keep_fp32: str | Collection[str] | None = None, exclude: Collection[str] = (),
                   smoke_test: bool = True, bias_correction: bool | str | None = None,
                   head: str | None = None) -> QuantReport:
    """Write the INT8 ``flavour`` (a name of :data:`FLAVOURS`) of the FP32 model ``fp32_path`` to ``out_path``.

    The activation ranges come from ``calibration`` (which must have been made on this model). ``se`` keeps the SE
    path in float ("fp32") or quantizes it ("int8"). ``cpu_options`` overrides the CPU or OpenVINO
    row's options (benchmarks).
    ``keep_fp32`` (TensorRT flavour): the FP16 keep-FP32 policy (:func:`sedeploy.fp16.parse_keep_fp32`; None: the
    FP16 artifact's default), applied exactly as to ``.fp16.onnx``. ``exclude``: node names (of the FP32 model, as
    :func:`~sedeploy.onnxcore.name_nodes` names them) kept in higher precision — in the TensorRT flavour an
    excluded Conv/Gemm/Add gets no Q/DQ and stays FP16; in the CPU flavour ORT's quantizer leaves it float.
    ``bias_correction`` corrects each quantized layer's bias for the mean shift its weight quantization causes
    (needs the calibration's channel means; the number of corrected layers is in ``settings``); None: the
    measured per-flavour default :data:`DEFAULT_BIAS_CORRECTION`; ``"measured"`` (TensorRT flavour, its default)
    then corrects each quantized layer's bias, layer after layer, by the output mean shift measured on the quantized
    model (:mod:`sedeploy.quantize.measured_bias`; it reads the first :data:`MEASURED_BIAS_IMAGES` calibration
    images, so ``calibration`` must come from :func:`calibrate` in this process). ``head``: ``"float"`` keeps the
    classifier head (:func:`head_layers`, with the ops that round its input in the CPU/OpenVINO forms) in the graph's
    float type, ``"int8"`` quantizes it; None: the flavour's measured default :data:`DEFAULT_HEAD_POLICY`.
    The file is checked with ``onnx.checker`` (full check), the TensorRT flavour also with the strong-typing check,
    loaded and run once in ONNX Runtime, and only then renamed into place; on any failure nothing is left at
    ``out_path``.
    """
    t0 = time.perf_counter()
    row = _check_request(flavour, se, calibration, keep_fp32, exclude)
    options = None if row.options is None else (cpu_options or row.options)
    head = head_policy(flavour, head)
    model, label = load_fp32(fp32_path)
    if options is not None and options.unify_concat:
        calibration = unify_concat_ranges(model, calibration)
    exclude = frozenset(exclude)
    unknown = sorted(exclude - {n.name for n in model.graph.node})
    if unknown:
        raise SedeployError(f"exclude names {len(unknown)} node(s) that '{label}' does not have: {unknown[:4]}.",
                            fix="pass node names of this FP32 model (sedeploy.quantize.weighted_layers lists them)")
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
    measured = bias_correction == "measured"
    if measured and not row.fp16_graph:
        raise SedeployError(f"bias_correction='measured' applies to the TensorRT flavour (float biases), not "
                            f"{flavour!r}.", fix="pass bias_correction=True (weight-only) or None (the default)")
    reference = copy_model(model, what="FP32 model")[0] if measured else None
    images = calibration_images(calibration) if measured else None  # before the work: a missing folder fails now
    if bias_correction:
        skip = set(exclude) | (se_nodes(model) if se == "fp32" else set())
        # the levels the flavour gives each layer's weights (CPU/OpenVINO options: 7-bit with reduce_range)
        seven = seven_bit_layers(model, calibration, options.reduce_range) if options is not None else set()
        qmax = {n.name: WEIGHT_QMAX_REDUCED if n.name in seven else WEIGHT_QMAX_FULL for n in model.graph.node}
        corrected = correct_biases(model, calibration, qmax, skip)
    model, settings = row.write(model, calibration, se, label, set(exclude), options, keep_fp32)
    if measured:
        settings["bias_measured_layers"] = correct_biases_measured(model, reference, images)
    fmt = "QOperator" if options is not None and options.format == "qoperator" else "QDQ"
    settings["strong_typing"] = require_strong_typing(model, label).summary()
    settings["bias_correction"] = "measured" if measured else bool(bias_correction)
    settings["bias_corrected_layers"] = corrected
    settings["head"] = {"policy": head, "layers": heads, "float_nodes": sorted(head_nodes)}
    set_metadata(model, {META.PRECISION: "int8", META.FLAVOUR: flavour, META.INT8_FORMAT: fmt, META.INT8_SE: se,
                         META.CALIBRATION_METHOD: calibration.method, META.CALIBRATION_KEY: calibration.key,
                         META.CALIBRATION_IMAGES: str(len(calibration.images))})
    counts = quantized_op_counts(model, qdq=fmt == "QDQ")
    if not counts:
        raise SedeployError(f"Quantizing '{label}' ({flavour}) quantized no operator.",
                            expected="a CNN with Conv/Gemm layers", fix="check the model is an image classifier")
    save_onnx(model, out_path, before_publish=(lambda tmp: smoke_run(tmp, label, fp16=row.fp16_graph))
              if smoke_test else None)
    histogram = dict(Counter(n.op_type for n in model.graph.node).most_common())
    return QuantReport(path=str(out_path), flavour=flavour, se=se, format=fmt, quantized_ops=counts,
                       op_histogram=histogram,
                       calibration={"method": calibration.method, "key": calibration.key,
                                    "images": len(calibration.images)},
                       settings=settings, seconds=round(time.perf_counter() - t0, 2))
