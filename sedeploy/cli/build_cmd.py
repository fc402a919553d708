"""`build-engine`: SE fusion, FP32/FP16/INT8 ONNX artifacts and engines, one staged build folder."""
from __future__ import annotations

from pathlib import Path

import click

from sedeploy.backends import BUILD_CHOICES
from sedeploy.cli.core import emit, handle_errors, progress, setup_logging
from sedeploy.cli.options import (BUDGET, CALIBRATION, ENGINES, INPUT, MODEL, TRT, depth, json_and_verbose,
                                  label_offset, out, threads)
from sedeploy.cli.parsing import parse_trt_profile, parse_triple
from sedeploy.cli.sections import Command, deprecated, option, stack
from sedeploy.onnxcore import parse_input_shape
from sedeploy.build import BuildOptions, build_engines, format_result

#: where `build-engine` writes by default, and so what a bare `sedeploy bench` benchmarks
DEFAULT_ENGINES = Path("engines")

model_options = stack(
    depth("With no MODEL: the SE-ResNet depth to export (or reuse) [default: the checkpoint's, else 50]."),
    option("--checkpoint", metavar="PATH_OR_URL", section=MODEL,
           help="With no MODEL: weights for the export (see `export`)."),
)

input_options = stack(
    option("--mean", default=None, section=INPUT, help="Foreign models: normalisation mean R,G,B (0–255 scale)."),
    option("--std", default=None, section=INPUT, help="Foreign models: normalisation std R,G,B (0–255 scale)."),
    option("--resize", type=int, default=None, section=INPUT,
           help="Foreign models: resize short side before the centre crop."),
    option("--input-shape", default=None, metavar="HxW", section=INPUT,
           help="Pin a MODEL's dynamic height and width, e.g. 48x192 (shapes are inferred again from it)."),
    option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=None, section=INPUT,
           help="Foreign models: the channel order the model was trained on [default: rgb]; --mean/--std are "
                "then per channel in that order."),
    option("--resize-mode", type=click.Choice(["crop", "pad"]), default=None, section=INPUT,
           help="Foreign models: crop = resize short side + centre crop [default]; pad = resize to the input "
                "height keeping the aspect ratio, width ≤ the input's, zero-padded (text classifiers, PP-OCR)."),
    option("--dynamic-batch", is_flag=True, section=INPUT,
           help="A fixed-batch MODEL: make the batch dynamic when provably safe (refused with the reason "
                "otherwise) [default: keep the fixed batch; larger batches are chunked]."),
    label_offset,
)

calibration_options = stack(
    option("--calib", type=click.Path(), default=None, section=CALIBRATION,
           help="Calibration images (flat or class-subfolder layout). Default with --int8: the shipped calib/."),
    option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile", "mse"]), default=None,
           section=CALIBRATION, help="Range estimator [default: mse, per tensor the clipping with the least "
                                     "quantization error; entropy is TensorRT's calibrator]."),
    option("--calib-count", type=int, default=None, section=CALIBRATION,
           help="Most calibration images used [default: 256]."),
    option("--calib-seed", type=int, default=0, show_default=True, section=CALIBRATION,
           help="Seed for picking the image subset."),
    option("--calib-batch", type=int, default=None, section=CALIBRATION,
           help="Calibration batch size (speed/memory only)."),
    option("--calib-cache", type=click.Path(dir_okay=False), default=None, section=CALIBRATION,
           help="Pin the calibration cache file (recomputed when its inputs changed)."),
    option("--val", type=click.Path(), default=None, section=CALIBRATION,
           help="Held-out images for the INT8 check and budget [default: --calib images calibration does not "
                "pick, or a seeded quarter of a --calib folder of ≤ --calib-count images, then not calibrated on]."),
    option("--warn-agreement", type=float, default=None, metavar="PCT", section=CALIBRATION,
           help="INT8 check: warn when an INT8 artifact's top-1 agreement with FP32 on held-out images (at most "
                "256, on the runtime that runs it) is below PCT [default: 97; 0 never warns]."),
)

budget_options = stack(
    option("--min-agreement", type=float, default=None, metavar="PCT", section=BUDGET,
           help="Top-1 agreement with FP32 on held-out images ≥ PCT; the most sensitive layers fall back to float "
                "until it holds (exit 3, nothing written, when it cannot)."),
    option("--max-top1-drop", type=float, default=None, metavar="PTS", section=BUDGET,
           help="Top-1 points lost vs FP32 on held-out images (needs labelled class folders)."),
    option("--budget-confidence", type=float, default=None, metavar="C", section=BUDGET,
           help="Meet the budget with the one-sided statistical bound at confidence C (e.g. 0.95) instead of the "
                "point figure on the held-out images, so it holds on unseen images too (needs more held-out "
                "images: ≥ 268 for 99 % at 0.95; refused up front when too few)."),
    option("--fallback-order", type=click.Choice(["sensitivity", "gain-per-cost"]), default=None, section=BUDGET,
           help="Which layers go back to float first — the most sensitive (fewest layers), or the most accuracy "
                "per multiply-add kept in float (least speed lost) [default: sensitivity]."),
    option("--max-fallback", type=int, default=None, section=BUDGET, help="Most layers allowed back in float."),
)

engine_options = stack(
    option("--fp16", is_flag=True, section=ENGINES,
           help="Also write the FP16 artifact (FP16 graph, FP32 inputs/outputs)."),
    option("--int8", is_flag=True, section=ENGINES,
           help="Also calibrate and write the INT8 artifacts: TensorRT Q/DQ, ONNX Runtime CPU, and OpenVINO when "
                "the backend is openvino."),
    option("--backend", type=click.Choice(BUILD_CHOICES), default="auto", show_default=True, section=ENGINES,
           help="Engine backend: auto = the fastest CPU backend installed (openvino when it imports on x86-64, "
                "else ort; a precision OpenVINO cannot compile is built on ort, said in the summary); ort = ONNX "
                "Runtime (CPU, runs everywhere); trt = TensorRT (NVIDIA GPU, `pip install sedeploy[tensorrt]`); "
                "openvino = OpenVINO (CPU, `pip install sedeploy[openvino]`); none = artifacts only."),
    option("--se-int8", type=click.Choice(["fp32", "int8"]), default=None, section=ENGINES,
           help="INT8 policy for the SE path (squeeze, FCs, gate, scale): keep in float or quantize "
                "[default: the measured choice, see benchmarks/results/int8_cpu_forms/results.md]."),
    option("--keep-fp32", default=None, metavar="GROUPS", section=ENGINES,
           help="FP16 policy: comma list of se_gate, se, head kept in FP32, or 'none' [default: measured]."),
    option("--no-fuse-se", is_flag=True, section=ENGINES, help="Skip the SE fusion pass."),
    threads,
)

trt_options = stack(
    option("--trt-profile", default=None, metavar="MIN,OPT,MAX", section=TRT,
           help="TensorRT optimization profile: smallest, tuned and largest batch (MIN ≤ OPT ≤ MAX) "
                "[default: 1,8,32]."),
    option("--workspace", type=float, default=4.0, show_default=True, section=TRT,
           help="TensorRT workspace limit, GiB."),
    option("--timing-cache", type=click.Path(dir_okay=False), default=None, section=TRT,
           help="TensorRT timing cache file (reused and updated; speeds up rebuilds)."),
    deprecated("--min-batch", "--trt-profile MIN,OPT,MAX", type=int),
    deprecated("--opt-batch", "--trt-profile MIN,OPT,MAX", type=int),
    deprecated("--max-batch", "--trt-profile MIN,OPT,MAX", type=int),
)


def build_options(*, trt_profile: tuple[int, int, int], workspace: float, **flat):
    """The one place the command line turns into the library's BuildOptions."""
    min_batch, opt_batch, max_batch = trt_profile
    return BuildOptions.from_flat(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                  workspace_gib=workspace, **flat)


@click.command("build-engine", cls=Command)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@model_options
@input_options
@engine_options
@calibration_options
@budget_options
@trt_options
@out("Folder for the artifacts, engines and manifest.json.", old="--out-dir", type=click.Path(file_okay=False),
     default=str(DEFAULT_ENGINES), show_default=True)
@json_and_verbose
@handle_errors
def build_engine(model, depth, mean, std, input_shape, out, as_json, verbose, trt_profile, deprecated_min_batch,
                 deprecated_opt_batch, deprecated_max_batch, **library_options):
    """Fuse SE blocks, write FP32/FP16/INT8 ONNX artifacts, and build engines from them.

    \b
    MODEL is an FP32 ONNX image classifier with one N×3×H×W or N×H×W×3 input (ours or any other; NHWC models get
    NCHW artifacts, dynamic H/W are pinned with --input-shape). Without MODEL the
    SE-ResNet of --depth (random weights, or --checkpoint) is used: a matching export by `sedeploy export`
    (./se-resnet50.onnx, or one in OUT) is reused, otherwise it is exported first (said on stderr).
    \b
    Examples:
      sedeploy build-engine --int8 --calib calib/              SE-ResNet-50: FP32 + calibrated INT8 in engines/
      sedeploy build-engine model.onnx --fp16 --int8 -o out/   any ONNX image classifier
      sedeploy build-engine model.onnx --int8 --min-agreement 99 --val val/
                                                               INT8 budget: layers fall back to float until met
      sedeploy build-engine engines/se-resnet50.int8-trt.onnx --backend trt --trt-profile 1,8,64 -o plans/
                                                               on a GPU machine: only the engine of an artifact
    \b
    Every requested precision is written as a portable ONNX file in OUT, whichever backend runs:
      <model>.fp32.onnx      SE-fused FP32 graph (numerically checked against the input, |Δ| ≤ 1e-5)
      <model>.fp16.onnx      FP16 graph, FP32 inputs/outputs (TensorRT 11 builds it as FP16)
      <model>.int8-trt.onnx  symmetric Q/DQ that obeys TensorRT's rules (checked by `sedeploy inspect`)
      <model>.int8-cpu.onnx  the form that runs fastest on ONNX Runtime CPU
      <model>.int8-ov.onnx   Q/DQ with uint8 after ReLU, int8 elsewhere: fastest and most faithful on OpenVINO
    \b
    OUT always holds one complete build: the set is written into a staging folder inside it and published
    with manifest.json only when everything succeeded (files of the previous build that this one does not
    write are removed). A failed, interrupted (Ctrl-C, SIGTERM, SIGHUP) or killed build leaves the previous set as
    it was, and a second build-engine into the same OUT is refused while one runs.
    """
    setup_logging(verbose)
    profile = parse_trt_profile(trt_profile, min_batch=deprecated_min_batch, opt_batch=deprecated_opt_batch,
                                max_batch=deprecated_max_batch)
    hw = parse_input_shape(input_shape)
    order = library_options["channel_order"]
    fuse_se = not library_options.pop("no_fuse_se")
    opts = build_options(trt_profile=profile, input_shape=hw, depth=int(depth) if depth else None,
                         mean=parse_triple(mean, "--mean", channel_order=order),
                         std=parse_triple(std, "--std", positive=True, channel_order=order),
                         fuse_se=fuse_se, progress=progress(as_json), **library_options)
    res = build_engines(model, out, opts)
    emit(res.as_dict(), as_json, format_result(res))
