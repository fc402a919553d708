"""The build (`sedeploy build-engine`): an FP32 ONNX classifier → portable precision artifacts → backend engines.

Data flow (every step reported in the result, every file written atomically)::

    model.onnx ─ fuse SE ─▶ <stem>.fp32.onnx ─ FP16 rewrite ─▶ <stem>.fp16.onnx
                                  │
                                  └─ calibrate on images ─▶ <stem>.int8-trt.onnx  (TensorRT Q/DQ rules, validated)
                                                            <stem>.int8-cpu.onnx  (fastest ONNX Runtime CPU form)
                                                            <stem>.int8-ov.onnx   (OpenVINO form, --backend openvino)
    each artifact ─ backend ─▶ ONNX Runtime optimized graph (.ort-opt.onnx + .ort.json),
                               TensorRT plan (.plan + .trt.json) or OpenVINO model (.ov.xml + .ov.json)

Why the artifacts are ONNX files first: TensorRT 11 builds every network strongly typed, so the precision must be
in the graph (FP16 tensors, explicit Q/DQ). The same files run on ONNX Runtime anywhere, so a model calibrated on
a CPU machine is carried to a GPU machine and built there (``sedeploy build-engine ARTIFACT.onnx --backend trt``).
An input that is already FP16 or INT8 is such an artifact: only the engine is built from it.

``manifest.json`` in the output folder lists what was written; ``sedeploy bench OUTDIR`` reads it.

A build is all-or-nothing: every option is checked before any work, the run holds an exclusive lock on the output
folder (a second build into it is refused), everything is written into a staging folder inside it, and only a
complete set is published (moved in, manifest last, with Ctrl-C/SIGTERM/SIGHUP held back for those few renames).
Files the previous manifest listed that the new build did not write are removed, so the folder always holds exactly
one build. A failed or interrupted build leaves the previous set untouched.

The modules follow the data flow: :mod:`~sedeploy.build.options` (every option checked first),
:mod:`~sedeploy.build.source` and :mod:`~sedeploy.build.inputs` (the source model, its input and preprocessing),
:mod:`~sedeploy.build.stages` (SE fusion, FP16), :mod:`~sedeploy.build.quantize` (calibration, INT8, the INT8 check),
:mod:`~sedeploy.build.engines` (backend engines), :mod:`~sedeploy.build.publish` (the staged set published) and
:mod:`~sedeploy.build.result` (the manifest's content and the summary); :mod:`~sedeploy.build.run` runs them.
"""
from __future__ import annotations

from sedeploy.build.inputs import MAX_RESIZE_FACTOR, default_calib_dir, foreign_preprocess, model_image_size
from sedeploy.build.options import BuildOptions
from sedeploy.build.result import BuildResult, format_result
from sedeploy.build.run import build_engines
from sedeploy.build.stages import FUSION_ATOL, FUSION_RTOL

__all__ = ["FUSION_ATOL", "FUSION_RTOL", "MAX_RESIZE_FACTOR", "BuildOptions", "BuildResult", "build_engines",
           "default_calib_dir", "foreign_preprocess", "format_result", "model_image_size"]
