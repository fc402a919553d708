"""The FP32 model every INT8 flavour quantizes: loaded and checked, its nodes named, Constant nodes made
initializers; the SE recogniser's nodes; the check that a calibration has a range for every activation a flavour
quantizes."""
from __future__ import annotations

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import (META, QDQ_OPS, QOPERATOR_OPS, copy_model, get_metadata, image_input, is_quantized,
                               name_nodes)
from sedeploy.passes import se_block_nodes
from sedeploy.quantize.calibration import CalibrationResult

MIN_OPSET = 13  # per-channel (axis) Q/DQ
#: op types that carry a weight
WEIGHTED = ("Conv", "Gemm")


def _onnx():
    import onnx

    return onnx


def load_fp32(fp32_path):
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


def se_nodes(model) -> set[str]:
    """Names of every SE block's nodes, from the one SE recogniser."""
    return {name for block in se_block_nodes(model) for name in block.all}


def check_ranges(model, calibration: CalibrationResult, tensors: list[str], label: str) -> None:
    missing = [t for t in dict.fromkeys(tensors) if t not in calibration.ranges]
    if missing:
        raise SedeployError(
            f"The calibration (method {calibration.method}, key {calibration.key[:12]}…) has no range for "
            f"{len(missing)} activation(s) of '{label}', e.g. {missing[:4]}: it does not match this model.",
            expected="a calibration of this very FP32 model (sedeploy.quantize.calibrate on the same .onnx)",
            fix="calibrate this model (or pass --calib-cache pointing at its own cache file)")
    bad = [t for t in tensors if not all(np.isfinite(calibration.ranges[t]))]
    if bad:
        raise SedeployError(f"Calibration ranges of {bad[:4]} are not finite.", fix="recalibrate")


def all_activations(model) -> set[str]:
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}

