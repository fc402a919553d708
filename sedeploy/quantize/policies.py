"""What INT8 keeps in float: the SE and classifier-head policies, the float groups of the accuracy budget, and the
layers (with their multiply-adds) a budget chooses from; what a written graph computes in int8."""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.onnxcore import QDQ_OPS, QOPERATOR_OPS, Graph
from sedeploy.quantize.cpu import CPU_OPTIONS, OV_OPTIONS
from sedeploy.quantize.source import WEIGHTED, load_fp32

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
#: ``"float"`` keeps a head in float only while it is cheap: at most this share of the model's multiply-adds. A
#: classifier that ends in a large convolution (SqueezeNet 1.1's 512→1000 1×1 conv on a 13×13 map: 25 % of its
#: multiply-adds) would otherwise run a quarter of its work in float — OpenVINO then ran SqueezeNet 1.1's int8-ov
#: artifact at 10.7 ms against NNCF's 6.2 ms (batch 1, one thread, benchmarks/results/zoo/). Heads of SE-ResNet-50
#: (0.05 %), MobileNet-V1 0.25 (0.6 %) and EfficientNet-Lite0 (0.3 %) stay float.
FLOAT_HEAD_MAX_MACS_SHARE = 0.02


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
                n.op_type not in WEIGHTED or g.made_by(n.input[1], "DequantizeLinear")):
            counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def weighted_layers(fp32) -> list[str]:
    """Names of the layers INT8 quantizes with a weight (Conv/Gemm with a constant weight), in graph order,
    as :func:`quantize_model` names them — what ``exclude`` takes."""
    model, _ = load_fp32(fp32)
    g = Graph(model)
    return [n.name for n in g.nodes if n.op_type in WEIGHTED and len(n.input) > 1
            and g.is_const(n.input[1]) and not g.is_const(n.input[0])]


def layer_macs(fp32) -> dict[str, int]:
    """Multiply-adds per image of each :func:`weighted_layers` layer: output positions (from ONNX shape inference)
    × the weight's elements per output channel × output channels, i.e. out_h·out_w·numel(weight) for a Conv and
    numel(weight) for a Gemm — what keeping the layer in float costs, up to the runtime's float/int8 speed ratio.
    Shape inference propagates constant shapes (``data_prop``); a model whose map sizes it still cannot tell is
    refused (the count would make such a layer look nearly free)."""
    import onnx

    model, label = load_fp32(fp32)
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
    model, _ = load_fp32(fp32)
    if flavour == "trt":
        return {layer: [layer] for layer in layers}
    g = Graph(model)
    by_name = {n.name: n for n in g.nodes}
    quantized = set((OV_OPTIONS if flavour == "ov" else CPU_OPTIONS).extra_ops) | set(WEIGHTED)
    groups = {}
    for layer in layers:
        group, todo = [layer], [by_name[layer].input[0]]
        while todo:
            p = g.producer.get(todo.pop())
            if p is None or p.op_type not in quantized or p.name in group:
                continue
            group.append(p.name)
            if p.op_type not in WEIGHTED:  # a weighted producer's own input stays INT8
                todo += [i for i in p.input if i and not g.is_const(i)]
        groups[layer] = group
    return groups


def head_layers(fp32) -> list[str]:
    """The classifier head: the weighted layers (Conv/Gemm with a constant weight) that the graph's outputs read
    with no other weighted layer in between (through Softmax, Reshape, Flatten …). ``fp32``: model or path."""
    model, _ = load_fp32(fp32)
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
        elif p.op_type not in WEIGHTED:
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
    quantized, or nothing would be) or cost more than :data:`FLOAT_HEAD_MAX_MACS_SHARE` of its multiply-adds;
    none under ``"int8"``."""
    if head_policy(flavour, head) != "float":
        return []
    heads = head_layers(fp32)
    if set(heads) >= set(weighted_layers(fp32)):
        return []
    from onnx.shape_inference import InferenceError

    try:
        macs = layer_macs(fp32)
    except (SedeployError, ValueError, InferenceError):  # map sizes or shapes unknown: the cost cannot be told,
        # and the head stays float as the policy says
        return heads
    share = sum(macs[h] for h in heads) / max(sum(macs.values()), 1)
    return heads if share <= FLOAT_HEAD_MAX_MACS_SHARE else []

