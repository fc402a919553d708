"""The pure parts of a TensorRT build: the version, the batch profile, the checks of the ONNX input and of the
build request, the network input and its optimization profile, the inspection of the built plan, and the check
that a plan fits the TensorRT and GPU at hand.

Nothing here imports ``tensorrt``: what needs it takes the module (or objects made by it) as an argument, so these
functions run against the test stand-in (tests/fake_tensorrt.py) exactly as against the real bindings.
:func:`sedeploy.backends.tensorrt.build_trt_engine` puts them together.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from sedeploy.backends.trt_support import layer_precisions
from sedeploy.checks import check_trt_qdq, format_report, require_strong_typing
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.onnxcore import META, QOPERATOR_OPS, as_model, get_metadata, graph_precision, is_quantized

log = logging.getLogger("sedeploy")


def parse_trt_version(text: str) -> tuple[int, int, int]:
    """``"10.13.0.35"`` → ``(10, 13, 0)``; ``"11.0.0"`` → ``(11, 0, 0)``. Compared as numbers, never as text
    (as text, "9.10" > "10.0")."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not match:
        raise SedeployError(f"Cannot read a TensorRT version from {text!r}.",
                            expected="a version such as '10.13.0.35' or '11.0.0'")
    major, minor, patch = (int(g or 0) for g in match.groups())
    return major, minor, patch


def _all_numbers(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(text)))


def validate_profile(min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
    """Check the batch range of the optimization profile: positive integers with min ≤ opt ≤ max."""
    values = (min_batch, opt_batch, max_batch)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise SedeployError(f"Batch profile min={min_batch}, opt={opt_batch}, max={max_batch} is not valid.",
                            expected="positive integers", fix="e.g. --trt-profile 1,8,32")
    if not min_batch <= opt_batch <= max_batch:
        raise SedeployError(f"Batch profile min={min_batch}, opt={opt_batch}, max={max_batch} is not ordered.",
                            expected="min ≤ opt ≤ max (TensorRT tunes kernels for opt and accepts min..max)",
                            fix="e.g. --trt-profile " + ",".join(map(str, sorted(values))))
    return values


def profile_shapes(input_shape: tuple[int, ...], min_batch: int, opt_batch: int,
                   max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """min/opt/max shapes for an N×C×H×W network input whose batch (only) may be dynamic (-1)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4:
        raise SedeployError(f"The network input has shape {list(shape)}.", expected="N×C×H×W (rank 4)")
    if any(d < 0 for d in shape[1:]):
        raise SedeployError(f"The network input {list(shape)} has dynamic channel or spatial dimensions.",
                            expected="only the batch dimension dynamic", fix="export with a fixed --input-size")
    if shape[0] >= 0:
        if (min_batch, opt_batch, max_batch) != (shape[0],) * 3:
            log.warning("The ONNX input has a fixed batch of %d: the engine is built for batch %d only "
                        "(export with a dynamic batch for the range %d..%d).", shape[0], shape[0], min_batch,
                        max_batch)
        return shape, shape, shape
    rest = shape[1:]
    return (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest)


def validate_trt_input(onnx_path: str | Path, model=None) -> dict[str, Any]:
    """Everything checked about an ONNX file before TensorRT sees it (the one place; the pipeline calls it for
    artifacts given as MODEL, :func:`~sedeploy.backends.tensorrt.build_trt_engine` for every build): the INT8 CPU
    form (QOperator ops, ``sedeploy.int8_flavour=cpu``) is refused, a Q/DQ model must pass TensorRT's Q/DQ rules,
    and every model the strong-typing check (:func:`sedeploy.checks.check_strong_typing`: what TensorRT's strongly
    typed parser would reject). Returns the strong-typing summary (recorded in the sidecar). ``model``: the file as
    read already (it is not read again)."""
    proto, label = (model, str(onnx_path)) if model is not None else as_model(onnx_path,
                                                                              what="ONNX model for TensorRT")
    flavour = str(get_metadata(proto).get(META.FLAVOUR, "")).strip('"')
    qoperator = sorted({n.op_type for n in proto.graph.node if n.op_type in QOPERATOR_OPS})
    if flavour == "cpu" or qoperator:
        raise SedeployError(f"'{label}' is the INT8 CPU form (ONNX Runtime QOperator ops such as "
                            f"{', '.join(qoperator[:3]) or 'QLinearConv'}), which TensorRT's ONNX parser does not "
                            "import.", expected="the TensorRT INT8 artifact (<model>.int8-trt.onnx, Q/DQ)",
                            fix="pass the .int8-trt.onnx written by the same build-engine run")
    if is_quantized(proto):
        report = check_trt_qdq(proto)
        if not report.ok:
            raise VerificationError(f"'{label}' breaks TensorRT's Q/DQ rules; no engine was built.\n"
                                    f"{format_report(report, precision=False)}",
                                    fix="rebuild the INT8 artifact with `sedeploy build-engine MODEL --int8`")
    return require_strong_typing(proto, label).summary()


def inspect_plan(trt, serialized, logger, input_name: str, opt_shape: tuple[int, ...],
                 label: str) -> dict[str, Any]:
    """Per-layer precisions of the just-built plan, from the engine inspector, inspected through an execution
    context whose input shape is set to the profile's opt shape — as TensorRT documents (NvInferRuntime.h: without
    one, "values dependent on input shapes will be displayed as -1 and format information will not be shown") and
    Polygraphy does. Every TensorRT return value on the way is checked."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise SedeployError(f"TensorRT could not deserialize the plan it just built from '{label}':\n{logger.take()}")
    context = engine.create_execution_context()
    if context is None:
        raise SedeployError(f"TensorRT could not create an execution context to inspect the plan built from "
                            f"'{label}' (out of GPU memory?):\n{logger.take()}")
    if not context.set_input_shape(input_name, tuple(opt_shape)):
        raise SedeployError(f"TensorRT refused the profile's opt shape {tuple(opt_shape)} for input '{input_name}' "
                            f"while inspecting the plan built from '{label}':\n{logger.take()}")
    inspector = engine.create_engine_inspector()
    if inspector is None:
        raise SedeployError(f"TensorRT could not create an engine inspector for the plan built from '{label}':\n"
                            f"{logger.take()}")
    inspector.execution_context = context
    if inspector.execution_context is None:
        raise SedeployError(f"TensorRT's engine inspector refused the execution context (plan built from "
                            f"'{label}'):\n{logger.take()}")
    info = layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    del inspector, context, engine, runtime  # inspector before context before engine before runtime
    return info


def _check_profile_added(index: int, shapes, tensor_name: str, label: str, logger) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SedeployError(f"TensorRT rejected the optimization profile for input '{tensor_name}' "
                            f"(min {list(shapes[0])}, opt {list(shapes[1])}, max {list(shapes[2])}) of '{label}': "
                            f"add_optimization_profile returned {index!r}.\n{logger.take()}",
                            expected="min ≤ opt ≤ max batch, the other dimensions equal to the network's",
                            fix="check --trt-profile MIN,OPT,MAX against the model's input")


def check_build_request(src: Path, min_batch: int, opt_batch: int, max_batch: int,
                        workspace_gib: float) -> tuple[dict[str, Any], str]:
    """Everything about a build request checked before TensorRT is even imported (a wrong input costs nothing):
    the ONNX file exists, the batch profile, the workspace, and :func:`validate_trt_input`. Returns the
    strong-typing summary and the graph's precision."""
    if not src.is_file():
        raise SedeployError(f"The ONNX file '{src}' does not exist.", fix="check the path")
    validate_profile(min_batch, opt_batch, max_batch)
    if isinstance(workspace_gib, bool) or not isinstance(workspace_gib, (int, float)) or not workspace_gib > 0 \
            or not math.isfinite(workspace_gib):
        raise SedeployError(f"Workspace {workspace_gib!r} GiB is not valid.", expected="a positive number of GiB",
                            fix="pass --workspace 4")
    typing = validate_trt_input(src)
    return typing, graph_precision(src)


def network_input(network, input_name: str | None, src: Path):
    """The parsed network's image-batch input: its only input, or the one named ``input_name``."""
    inputs = {t.name: t for t in (network.get_input(i) for i in range(network.num_inputs))}
    if (input_name is None and len(inputs) != 1) or (input_name is not None and input_name not in inputs):
        raise SedeployError(f"'{src}' has the inputs {', '.join(inputs)}; which is the image batch?",
                            expected="one input, or input_name= naming one of them")
    return inputs[input_name] if input_name else next(iter(inputs.values()))


def add_batch_profile(builder, config, tensor_name: str, shapes, label: str, logger) -> None:
    """One optimization profile (min/opt/max ``shapes``) for the input ``tensor_name``, added to ``config``;
    what the bindings raise or return on the way is checked."""
    profile = builder.create_optimization_profile()
    try:
        profile.set_shape(tensor_name, *shapes)
    except ValueError as err:  # the bindings raise on an inconsistent min/opt/max
        raise SedeployError(f"TensorRT rejected the batch profile for input '{tensor_name}' of '{label}': {err}",
                            fix="check --trt-profile MIN,OPT,MAX") from err
    _check_profile_added(config.add_optimization_profile(profile), shapes, tensor_name, label, logger)


def check_plan_compatible(meta: dict[str, Any], tensorrt_version: str, device: dict[str, str], plan: str) -> None:
    """Refuse a plan from another TensorRT version or GPU architecture; another GPU model of the same
    architecture only warns."""
    fix = f"rebuild the engine on this machine from its ONNX file ({meta.get('source_model', 'the source model')})"
    built = str(meta.get("tensorrt_version", "?"))
    if _all_numbers(built) != _all_numbers(tensorrt_version):
        raise SedeployError(f"The plan '{plan}' was built with TensorRT {built}; this is TensorRT "
                            f"{tensorrt_version}. TensorRT plans are not portable across TensorRT versions or GPUs.",
                            fix=fix)
    cc = str(meta.get("compute_capability", "?"))
    if cc != device["compute_capability"]:
        raise SedeployError(f"The plan '{plan}' was built for compute capability {cc} ({meta.get('gpu')}); this "
                            f"GPU is {device['gpu']} ({device['compute_capability']}). TensorRT plans are not "
                            "portable across GPU architectures.", fix=fix)
    if meta.get("gpu") != device["gpu"]:
        log.warning("The plan '%s' was built on %s and runs on %s (same architecture): timings may differ.",
                    plan, meta.get("gpu"), device["gpu"])
