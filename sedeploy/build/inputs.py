"""The model's input as every artifact takes it: its image size (``--input-shape`` pins a dynamic one), its
preprocessing (recorded in the model, given, or mmcls's at that size), NCHW layout, the check images and the shape
report."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy.build.options import BuildOptions
from sedeploy.build.result import BuildResult
from sedeploy.errors import SedeployError
from sedeploy.export import DEFAULT_CALIB_DIR
from sedeploy.onnxcore import (META, check_input_memory, get_metadata, image_input, load_onnx, nchw_input, output_kind,
                               pin_image_size, set_metadata)
from sedeploy.preprocess import Preprocess, check_normalisation, load_folder, smooth_noise

log = logging.getLogger("sedeploy")


def default_calib_dir() -> Path:
    return DEFAULT_CALIB_DIR


#: --resize may be at most this many times the crop (mmcls resizes 256 for a 224 crop; 100,000 px ran out of memory)
MAX_RESIZE_FACTOR = 8


def foreign_preprocess(model: str | Path, *, head=None, mean: tuple[float, float, float] | None = None,
                       std: tuple[float, float, float] | None = None, resize: int | None = None,
                       input_shape: tuple[int, int] | None = None, channel_order: str | None = None,
                       resize_mode: str | None = None) -> Preprocess:
    """The preprocessing of a foreign MODEL (``--mean/--std/--resize/--channel-order/--resize-mode``): what the
    model records (a sedeploy export), else the mmcls pipeline at the model's input size (``input_shape`` (H, W)
    where H/W are dynamic), with the given values in place. ``resize`` (the short side before the centre crop) from
    the crop's short side to :data:`MAX_RESIZE_FACTOR` × it. Mean/std on the 0–1 scale are refused with the
    values they stand for on 0–255 pixels. ``head``: MODEL as read already (without its weights), so it is not
    read again."""
    proto = load_onnx(model, weights=False, check=False) if head is None else head
    h, w = model_image_size(image_input(proto, path=str(model), dynamic_hw=True), input_shape, path=str(model))
    check_normalisation(mean, std)
    short = min(h, w)
    if resize is not None and resize_mode == "pad":
        raise SedeployError(f"--resize {resize} sets the short side before a centre crop; --resize-mode pad "
                            f"resizes every image to the input height ({h} px) instead.",
                            fix="drop --resize, or use --resize-mode crop")
    if resize is not None and not short <= resize <= MAX_RESIZE_FACTOR * short:
        raise SedeployError(f"--resize {resize} is not valid for a {h}×{w} input.",
                            expected=f"a short-side size from the crop's short side ({short} px) to "
                                     f"{MAX_RESIZE_FACTOR * short} ({MAX_RESIZE_FACTOR}× it)",
                            fix=f"omit --resize (default {round(short * 256 / 224)}), or pass {short}–"
                                f"{MAX_RESIZE_FACTOR * short}")
    base = Preprocess.for_size(h, width=None if w == h else w)
    stored = get_metadata(proto).get(META.PREPROCESS)
    if isinstance(stored, dict):
        try:
            recorded = Preprocess.from_dict(stored)
        except (TypeError, SedeployError):
            recorded = None
        if recorded is not None and recorded.shape == (h, w):
            base = recorded
    return dataclasses.replace(base, resize_short=base.resize_short if resize is None else resize,
                               mean=mean or base.mean, std=std or base.std,
                               channel_order=channel_order or base.channel_order,
                               resize_mode=resize_mode or base.resize_mode)


def model_image_size(inp, input_shape: tuple[int, int] | None, *, path: str) -> tuple[int, int]:
    """(H, W) the build runs ``inp`` at: its own, or ``input_shape`` where H/W are dynamic (refused when missing,
    or when it contradicts a fixed size)."""
    if inp.dynamic_hw and input_shape is None:
        raise SedeployError(f"'{path}' input '{inp.name}' has shape {inp.shape}: its height and width are dynamic.",
                            expected="an image size to build for (engines, calibration and benchmarks run one "
                                     "fixed H×W)",
                            fix="pin it with --input-shape HxW: the size the model is used at (its documentation or "
                                "exporter states it), e.g. --input-shape 224x224 or --input-shape 48x192")
    if input_shape is None:
        return inp.height, inp.width
    h, w = input_shape
    if (inp.height or h, inp.width or w) != (h, w):
        raise SedeployError(f"--input-shape {h}x{w} does not fit '{path}': its input '{inp.name}' is fixed at "
                            f"{inp.shape}.",
                            fix=f"drop --input-shape (it pins dynamic H/W only), or pass "
                                f"{inp.height or h}x{inp.width or w}")
    return h, w


def preprocess_for(meta: dict[str, Any], hw: tuple[int, int], given: Preprocess | None,
                   res: BuildResult | None = None) -> Preprocess:
    stored = meta.get(META.PREPROCESS)
    recorded = None
    if isinstance(stored, dict):
        try:
            recorded = Preprocess.from_dict(stored)
        except (TypeError, SedeployError):
            log.warning("Ignoring unreadable preprocessing metadata %s; using the mmcls pipeline at %d×%d px.",
                        stored, *hw)
    if given is not None:
        if given.shape != tuple(hw):
            raise SedeployError(f"The preprocessing makes {given.shape[0]}×{given.shape[1]} images but the model's "
                                f"input is {hw[0]}×{hw[1]} px.",
                                fix="build it for the model's input size (Preprocess.for_size(H, width=W), or "
                                    "foreign_preprocess(MODEL, …))")
        if recorded is not None and recorded != given:  # --mean/--std/… on a sedeploy export: said, then used
            msg = (f"the preprocessing given ({given.describe()}) replaces the one the model records "
                   f"({recorded.describe()}); every artifact records the given one")
            log.warning("%s%s.", msg[0].upper(), msg[1:])
            if res is not None:
                res.notes.append(msg)
        return given
    if recorded is not None:
        return recorded
    return Preprocess.for_size(hw[0], width=None if hw[0] == hw[1] else hw[1])


def prepare_input(proto, opt: BuildOptions, src: Path, res: BuildResult):
    """The FP32 model with the input every artifact takes: H/W pinned (``--input-shape``, onnx-ir + shape
    inference) and NCHW (an NHWC model's converter Transpose dropped, or one Transpose added), recorded in the
    metadata and the notes."""
    inp = image_input(proto, path=str(src), dynamic_hw=True)
    h, w = model_image_size(inp, opt.source.input_shape, path=str(src))
    changes: dict[str, Any] = {"source_shape": inp.shape, "source_layout": inp.layout}
    if inp.dynamic_hw:
        proto = pin_image_size(proto, h, w, path=str(src))
        changes["pinned"] = [h, w]
        res.notes.append(f"input H×W pinned to {h}×{w} (--input-shape): shapes inferred again from it")
    proto, how = nchw_input(proto, path=str(src))
    if how is not None:
        changes["to_nchw"] = how
        res.notes.append(f"NHWC input {'×'.join(map(str, inp.shape))}: {how}; every artifact and engine takes "
                         "N×3×H×W (as fast as the NHWC graph fed from sedeploy's N×3×H×W batches on ONNX Runtime and "
                         "OpenVINO: benchmarks/results/input_layout)")
    final = image_input(proto, path=str(src))
    check_input_memory(final, path=str(src), option=f"--input-shape {h}x{w}" if inp.dynamic_hw else None)
    set_metadata(proto, {META.INPUT_LAYOUT: final.layout, META.INPUT_CHANGES: changes})
    return proto, final, changes


def check_images(pp: Preprocess, folder: Path | None, limit: int = 8) -> np.ndarray:
    what = "calibration image folder (--calib)" if folder else "shipped calibration image folder"
    images, _ = load_folder(folder or default_calib_dir(), pp, limit=limit, what=what)
    return np.concatenate([images, smooth_noise(2, pp.shape, seed=1)]).astype(np.float32)


def shape_report(proto, inp, changes: dict[str, Any] | None = None, pp: Preprocess | None = None) -> dict[str, Any]:
    """How the input's batch and layout are handled and what the output holds (said in the summary and the
    manifest)."""
    batch = inp.static_batch
    report = {"input": [batch or "N", *inp.shape[1:]], "layout": inp.layout, "static_batch": batch,
              "batch_handling": (f"fixed batch {batch}: kept as exported; verification, calibration and the INT8 "
                                 f"checks run it {batch} image(s) at a time (larger batches are chunked and padded)"
                                 if batch else "dynamic batch"),
              "output": output_kind(proto)}
    if changes and (changes.get("pinned") or changes.get("to_nchw")):
        report["source_input"] = changes["source_shape"]
        report["input_changes"] = {k: v for k, v in changes.items() if k in ("pinned", "to_nchw")}
    if pp is not None:
        report["preprocess"] = pp.describe()
    return report
