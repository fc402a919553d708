"""Bias correction: each quantized layer's bias corrected for the mean shift its weight quantization causes."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sedeploy.onnxcore import Graph, attr
from sedeploy.quantize.calibration import CalibrationResult
from sedeploy.quantize.source import WEIGHTED

_SMALLEST_SCALE = 1e-12  # weight fake-quantization for bias correction: an all-zero channel still has a scale
#: symmetric weight levels: full int8 [-127, 127] (TensorRT); ORT's reduce_range int8 [-64, 64] (CPU, OpenVINO)
WEIGHT_QMAX_FULL, WEIGHT_QMAX_REDUCED = 127.0, 64.0
#: On for both flavours, by measurement (benchmarks/results/int8_calibration/, every layer INT8, percentile ranges,
#: top-1 agreement / mean KL vs FP32). CPU flavour (7-bit weights): tiny SE-ResNet-18 99.4 → 99.6 %, KL 5.70e-3 →
#: 4.94e-3; foreign MobileNetV3-like 99.67 → 100 %; SE-ResNet-50 (random weights, real images) 86.5 → 90.6 %, KL
#: 0.167 → 0.099. TensorRT flavour: tiny 99.0 → 99.4 % (KL 9.19e-3 → 1.00e-2, the one worse KL), foreign
#: 99.67 → 100 %, SE-ResNet-50 KL 0.087 → 0.079. Never lower agreement with the default estimator.
#: OpenVINO flavour (benchmarks/results/zoo_int8/, 7-bit weights, agreement with FP32): MobileNet-V1 0.25 69.6 →
#: 90.3 % (its depthwise weights, quantized per channel, shift the channel means most), SqueezeNet 1.1 95.0 →
#: 96.3 %; tiny SE-ResNet-18 99.2 → 99.8 %, SE-ResNet-50 (random weights, 300 images) 86.7 → 88.7 %.
#: TensorRT flavour: "measured" — the weight correction, then :mod:`sedeploy.quantize.measured_bias` on the
#: quantized model (its activations keep 127 levels even after ReLU6, and that shift only a measurement sees):
#: agreement with FP32 MobileNet-V1 0.25 84.6 → 86.9 %, SqueezeNet 1.1 95.8 → 97.3 %, EfficientNet-Lite0 97.7 →
#: 98.2 % (benchmarks/results/zoo_int8/results-trt.md, 1,236 images).
DEFAULT_BIAS_CORRECTION = {"cpu": True, "trt": "measured", "ov": True}


def _fake_quant(w: np.ndarray, axis: int, qmax: float) -> np.ndarray:
    """Symmetric per-channel (``axis``) quantize → dequantize, as both flavours quantize weights."""
    moved = np.moveaxis(w, axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.maximum(amax / qmax, _SMALLEST_SCALE).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.moveaxis(np.clip(np.rint(moved / scale), -qmax, qmax) * scale, 0, axis)


def correct_biases(model, calibration: CalibrationResult, qmax: float | Mapping[str, float], skip: set[str]) -> int:
    """Bias correction (Nagel et al. 2019, "Data-free quantization", empirical form): quantizing a weight W to W_q
    shifts the layer's expected output by (W_q − W)·E[x]; subtracting that from the bias restores the mean. E[x] is
    the per-channel mean of the layer's input over the calibration images (``calibration.channel_means``; a
    zero-padded border is treated like the interior). ``qmax``: the weights' symmetric levels (one for every
    layer, or per node name). In place; returns
    how many layers were corrected."""
    from onnx import numpy_helper

    g = Graph(model)
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for n in g.nodes:
        if n.op_type not in WEIGHTED or n.name in skip or len(n.input) < 2 or n.input[1] not in inits:
            continue
        levels = qmax.get(n.name, WEIGHT_QMAX_FULL) if isinstance(qmax, Mapping) else qmax
        mean = calibration.channel_means.get(n.input[0])
        if mean is None or attr(n, "transA", 0):
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        m = np.asarray(mean, np.float64)
        if n.op_type == "Conv":
            dw = (_fake_quant(w, 0, levels) - w).reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [out, in/groups]
            groups = int(attr(n, "group", 1))
            per_group = w.shape[0] // groups
            idx = (np.arange(w.shape[0])[:, None] // per_group) * w.shape[1] + np.arange(w.shape[1])[None, :]
            if idx.max() >= m.size:
                continue
            delta = (dw * m[idx]).sum(1)
            scale = 1.0
        else:
            axis = 0 if attr(n, "transB", 0) else 1
            dw = _fake_quant(w, axis, levels) - w
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

