"""TensorRT's explicit-quantization rules that :func:`sedeploy.checks.trt_qdq.check_trt_qdq` applies, with their sources.

Kept apart from the checker so the rule table (what is checked, why, and how to fix it) reads on its own.
"""
from __future__ import annotations

from dataclasses import dataclass


TRT_GUIDE = ("TensorRT Developer Guide, 'Explicit Quantization' (per-tensor activations; per-channel weights on the "
             "output-channel axis; Gemm transB note; QLinearConv/ConvInteger unsupported; Q/DQ placement advice)")
ONNX_TRT_OPS = ("onnx-tensorrt docs/operators.md (QuantizeLinear/DequantizeLinear: INT8, zero point must be 0; "
                "QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, DynamicQuantizeLinear: not supported)")
ONNX_TRT_PARSER = ("onnx-tensorrt onnxOpImporters.cpp (DequantizeLinear: addDequantize(data, scale, scaleType)) "
                   "and TensorRT's strong typing (NetworkDefinitionCreationFlag.STRONGLY_TYPED; every network in 11)")
ONNX_SPEC = "ONNX operators QuantizeLinear/DequantizeLinear (axis since opset 13; no zero point means uint8)"


@dataclass(frozen=True)
class Violation:
    """One finding of a check: which rule, how severe, where, what was found and how to fix it."""

    rule: str
    severity: str
    node: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.found}. Fix: {self.fix}"


@dataclass(frozen=True)
class Rule:
    severity: str  # "error" | "warning"
    summary: str
    fix: str
    source: str


#: Every rule :func:`check_trt_qdq` applies, by id. Errors: TensorRT rejects the graph, or it would not be INT8 as
#: intended. Warnings: NVIDIA's placement recommendations.
RULES: dict[str, Rule] = {
    "no-qdq": Rule("error", "the model has no QuantizeLinear/DequantizeLinear nodes, so TensorRT builds it in float",
                   "quantize it first (sedeploy's INT8 Q/DQ artifact for TensorRT)", TRT_GUIDE),
    "opset": Rule("error", "default-domain opset below 13 has no per-channel (axis) Q/DQ",
                  "re-export at opset 13 or newer (sedeploy exports 18 by default)", ONNX_SPEC),
    "qoperator": Rule("error", "quantized operator (QOperator / integer op) that TensorRT's parser does not import",
                      "quantize in QDQ format (QuantizeLinear/DequantizeLinear around float ops), not QOperator",
                      ONNX_TRT_OPS),
    "zero-point-nonzero": Rule("error", "zero point is not 0: TensorRT quantization is symmetric",
                               "quantize symmetrically (activations: ActivationSymmetric=True; weights: "
                               "WeightSymmetric=True)", ONNX_TRT_OPS),
    "zero-point-dtype": Rule("error", "quantized type is not int8: TensorRT quantizes to signed int8 only, and a "
                             "QuantizeLinear without a zero point is where the runtimes part: ONNX says uint8 (ONNX "
                             "Runtime computes uint8) while TensorRT's parser accepts it and defaults to INT8, so "
                             "the same file computes different values on the two",
                             "quantize activations and weights as signed int8 (QInt8/QInt8) with an explicit int8 "
                             "zero point of 0 on every QuantizeLinear/DequantizeLinear", ONNX_TRT_OPS),
    "qparam-not-constant": Rule("error", "scale or zero point is computed at run time",
                                "store scales and zero points as initializers", ONNX_TRT_OPS),
    "scale-invalid": Rule("error", "scale is not positive and finite",
                          "recalibrate; a zero or negative scale comes from an empty or constant calibration range",
                          TRT_GUIDE),
    "activation-per-channel": Rule("error", "activation Q/DQ with more than one scale (TensorRT quantizes "
                                   "activations per tensor only)", "use one scale per activation tensor",
                                   TRT_GUIDE),
    "per-channel-not-weight": Rule("error", "per-channel DequantizeLinear that does not feed the weight input of "
                                   "Conv/ConvTranspose/Gemm/MatMul", "quantize this tensor per tensor",
                                   TRT_GUIDE),
    "weight-axis": Rule("error", "per-channel weight scales on an axis other than the output-channel axis",
                        "Conv: axis 0; ConvTranspose: axis 1; Gemm: axis 0 with transB=1, axis 1 with transB=0; "
                        "MatMul (2-D weight): axis 1", TRT_GUIDE),
    "int32-dequantize": Rule("error", "DequantizeLinear of an int32 tensor (a quantized bias)",
                             "keep biases in float (ORT quantize_static extra option QuantizeBias=False)",
                             ONNX_TRT_OPS),
    "mixed-weighted": Rule("error", "weighted op with only one of activation and weight quantized",
                           "quantize both the data input and the weight, or neither", TRT_GUIDE),
    "q-without-dq": Rule("error", "QuantizeLinear whose output is used by something other than DequantizeLinear",
                         "every QuantizeLinear must be followed only by DequantizeLinear (Q/DQ pairs)", TRT_GUIDE),
    "qdq-pair-mismatch": Rule("warning", "Q→DQ pair with different scales or zero points (a requantization)",
                              "use the same scale and zero point on both nodes of a pair", TRT_GUIDE),
    "dq-input-not-q": Rule("warning", "DequantizeLinear of a tensor that is neither a constant nor a "
                           "QuantizeLinear output", "feed DequantizeLinear from QuantizeLinear or a weight",
                           TRT_GUIDE),
    "custom-domain": Rule("warning", "operator outside the ONNX domain (TensorRT needs a plugin for it)",
                          "export without runtime-specific fusions (e.g. ONNX Runtime's com.microsoft ops)",
                          ONNX_TRT_OPS),
    "residual-add": Rule("warning", "residual Add whose other input is a convolution should have only its skip "
                         "input quantized: then TensorRT fuses the add into that convolution with an INT8 output "
                         "(not checked where the other input is not a convolution, e.g. the SE scale Mul of "
                         "SE-ResNet: there is nothing to fuse into)",
                         "put Q/DQ on the skip (identity/downsample) input of the Add and not on the other",
                         TRT_GUIDE),
    "sensitive-op-quantized": Rule("warning", "Sigmoid/ReduceMean/GlobalAveragePool input is quantized",
                                   "leave the SE gate and the pools in float (exclude these op types from "
                                   "quantization)", TRT_GUIDE),
    "strong-typing-scale": Rule("error", "a Q/DQ scale of one float type feeds a region of another (e.g. a "
                                "float32 scale in an FP16 graph): under strong typing DequantizeLinear outputs its "
                                "scale's type, so TensorRT's type inference fails at the next op",
                                "give every scale the float type of the tensor it quantizes (float16 scales need "
                                "opset ≥ 19)", ONNX_TRT_PARSER),
    "strong-typing-mixed": Rule("error", "op whose float inputs have different types: a strongly typed network "
                                "does not promote types implicitly", "insert an explicit Cast so that all float "
                                "inputs of the op have one type", ONNX_TRT_PARSER),
    "weighted-op-float": Rule("warning", "Conv/Gemm/MatMul with a constant weight left unquantized in a Q/DQ "
                              "model (it runs in float)", "quantize its inputs, or confirm it is meant to stay float",
                              TRT_GUIDE),
}

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SENSITIVE_OPS = ("Sigmoid", "HardSigmoid", "ReduceMean", "GlobalAveragePool")
