"""Making a classifier's image input what the build runs on: fixed H×W and NCHW, with well-kept tools.

- :func:`pin_image_size` fixes dynamic H/W (``build-engine --input-shape HxW``) with onnx-ir, then reruns ONNX shape
  inference over the whole graph (every intermediate shape is inferred again from the pinned input);
- :func:`nchw_input` gives an NHWC (channels-last) model an NCHW input: where the graph's first step is the
  converter's own Transpose to NCHW (tf2onnx writes one), that Transpose is dropped and the input feeds its
  consumers directly, as ``tf2onnx --inputs-as-nchw`` would have exported it; otherwise one Transpose is added at
  the input. The input keeps its name.

Both return a new model and leave the caller's untouched.
"""
from __future__ import annotations

from sedeploy.errors import SedeployError
from sedeploy.onnxcore.io import ImageInput, image_input
from sedeploy.onnxcore.session import cpu_session
from sedeploy.preprocess import layout_batch, smooth_noise

#: NHWC → NCHW, the permutation a channels-last graph applies before its first convolution
TO_NCHW = (0, 3, 1, 2)


def parse_input_shape(text: str | None, option: str = "--input-shape") -> tuple[int, int] | None:
    """``"48x192"`` → (48, 192) (height, width); ``"224"`` → (224, 224)."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        hw = tuple(int(v) for v in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 8:
        raise SedeployError(f"{option} '{text}' is not valid.",
                            expected="HEIGHTxWIDTH in pixels, each ≥ 8 (or one number for a square input)",
                            fix=f"e.g. {option} 224x224, or {option} 48x192")
    return hw  # type: ignore[return-value]


def pin_image_size(proto, height: int, width: int, *, path: str = "model"):
    """A copy of ``proto`` whose dynamic H and W are fixed to ``height``×``width`` and whose intermediate shapes
    are inferred again from it. Refused (naming the model) when the graph cannot take that size."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass

    inp = image_input(proto, path=path, dynamic_hw=True)
    for have, want, what in ((inp.height, height, "height"), (inp.width, width, "width")):
        if have is not None and have != want:
            raise SedeployError(f"--input-shape {height}x{width} does not fit '{path}': its input '{inp.name}' "
                                f"has a fixed {what} of {have} (shape {inp.shape}).",
                                fix=f"give the fixed size (--input-shape {inp.height or height}x{inp.width or width}),"
                                    " or drop --input-shape when H and W are both fixed")
    model = ir.serde.deserialize_model(proto)
    value = next(v for v in model.graph.inputs if v.name == inp.name)
    batch = inp.batch if isinstance(inp.batch, int) and inp.batch > 0 else (
        inp.batch if isinstance(inp.batch, str) and inp.batch != "?" else "N")
    dims = [batch, 3, height, width] if inp.layout == "NCHW" else [batch, height, width, 3]
    value.shape = ir.Shape(dims)
    for node in model.graph:  # every shape below the input is stale: inferred again from the pinned one
        for out in node.outputs:
            if out not in model.graph.outputs:
                out.shape = None
    try:
        model = ShapeInferencePass(strict_mode=True, data_prop=True)(model).model
        pinned = ir.serde.serialize_model(model)
        onnx.checker.check_model(pinned)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SedeployError(f"'{path}' cannot run at --input-shape {height}x{width}: ONNX shape inference "
                            f"fails ({first}).",
                            fix="pass the size the model is used at (its documentation or exporter states it)"
                            ) from err
    _run_once(pinned, inp, height, width, path)
    return pinned


def _run_once(model, inp: ImageInput, height: int, width: int, path: str) -> None:
    """Run the pinned model once on smooth noise: a size the graph's own constants contradict (a Reshape to a fixed
    length) passes shape inference and fails only here."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    import onnx

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return  # weights in external files (or not loaded): the build runs the model on images right after
    x = layout_batch(smooth_noise(inp.static_batch or 1, (height, width), seed=13), inp.layout)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the error is reported below, once, in sedeploy's words
    try:
        cpu_session(model, threads=1).run(None, {inp.name: x}, quiet)
    except (Fail, InvalidArgument, RuntimeException) as err:
        msg = str(err).split("Status Message:")[-1].strip().splitlines()[0]
        first = ". ".join(msg.split(". ")[-2:])[:240]  # ORT's own words, without its source location
        raise SedeployError(f"'{path}' cannot run at --input-shape {height}x{width}: ONNX Runtime fails on it "
                            f"({first}).",
                            fix="pass the size the model is used at (its documentation or exporter states it)"
                            ) from err


def nchw_input(proto, *, path: str = "model"):
    """(a copy of ``proto`` whose image input is NCHW, how: "dropped the converter's Transpose" / "added one
    Transpose"); an NCHW model is returned as is (how: None)."""
    import onnx
    from onnx import helper

    inp: ImageInput = image_input(proto, path=path, dynamic_hw=True)
    if inp.layout == "NCHW":
        return proto, None
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    value = next(v for v in g.input if v.name == inp.name)
    dims = value.type.tensor_type.shape.dim
    order = [0, 3, 1, 2]
    new_dims = [onnx.TensorShapeProto.Dimension() for _ in order]
    for nd, k in zip(new_dims, order):
        nd.CopyFrom(dims[k])
    del dims[:]
    dims.extend(new_dims)
    users = [n for n in g.node if inp.name in n.input]
    perm = None
    if len(users) == 1 and users[0].op_type == "Transpose" and inp.name not in {o.name for o in g.output}:
        perm = next((tuple(a.ints) for a in users[0].attribute if a.name == "perm"), None)
    if perm == TO_NCHW:  # the converter's own NHWC → NCHW step: its consumers read the input directly
        first = users[0]
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == first.output[0]:
                    n.input[k] = inp.name
        for o in g.output:
            if o.name == first.output[0]:
                raise SedeployError(f"'{path}' is only a Transpose of its input.", fix="pass a classifier")
        g.node.remove(first)
        how = "dropped the converter's NHWC→NCHW Transpose: the input feeds the first layer directly"
    else:
        inner = _unique(g, f"{inp.name}_nhwc")
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == inp.name:
                    n.input[k] = inner
        g.node.insert(0, helper.make_node("Transpose", [inp.name], [inner], perm=[0, 2, 3, 1],
                                          name=_unique(g, "sedeploy_nchw_to_nhwc")))
        how = "added one Transpose (NCHW→NHWC) at the input"
    for vi in list(g.value_info):  # the converter's Transpose output no longer exists
        if vi.name not in {o for n in g.node for o in n.output}:
            g.value_info.remove(vi)
    return model, how


def _unique(graph, name: str) -> str:
    used = {v for n in graph.node for v in (*n.input, *n.output, n.name)} | {i.name for i in graph.input}
    while name in used:
        name += "_"
    return name
