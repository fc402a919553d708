"""Peers measured in the same benchmark run: OpenVINO FP32 and OpenVINO + NNCF INT8 of the same network.

A speed claim against "OpenVINO" means something only when OpenVINO ran in the same process, interleaved with
sedeploy's engines, on the same inputs. ``sedeploy bench --peers`` adds two rows built here:

- ``peer:openvino-fp32`` — OpenVINO reads the benchmark's FP32 ONNX file itself (no sedeploy engine involved);
- ``peer:openvino-nncf-int8`` — that model quantized by ``nncf.quantize`` with NNCF's own defaults (its default
  preset, default subset size, no ignored scope) on the *same calibration images* sedeploy's INT8 artifacts were
  calibrated on: the folder, seed and count recorded in the build's ``manifest.json`` (next to the FP32 ONNX), or
  a folder passed explicitly.

Both run through :class:`~sedeploy.backends.openvino.OpenVinoModelRunner` with the benchmark's thread count, the
LATENCY hint and an explicit f32 inference precision for everything not quantized — the same settings as
sedeploy's own OpenVINO engines, so neither side gets bf16 (OpenVINO's default on AMX / AVX512-BF16 CPUs) while the
other does not. ``openvino`` and ``nncf`` are imported only when peers are asked for; without them the request
fails with exit 4 and the install hint (``pip install 'sedeploy[peers]'``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy import quantize
from sedeploy.backends.openvino import OpenVinoModelRunner
from sedeploy.bench.engines import EngineSpec, source_onnx
from sedeploy.errors import MissingDependencyError, SedeployError
from sedeploy.layout import MANIFEST, Manifest
from sedeploy.preprocess import Preprocess, load_batch

log = logging.getLogger("sedeploy")

__all__ = ["PEER_FP32", "PEER_NNCF", "Peer", "peer_calibration", "nncf_int8", "make_peers", "fp32_onnx_of"]

PEER_FP32 = "peer:openvino-fp32"
PEER_NNCF = "peer:openvino-nncf-int8"
PEERS_EXTRA = "peers"


@dataclass
class Peer:
    """One peer row: its description (for the report and the accuracy pass) and its inactive runner."""

    spec: EngineSpec
    runner: Any
    about: str


def _require(purpose: str):
    import importlib

    try:
        importlib.import_module("openvino")
    except ImportError as err:
        raise MissingDependencyError("openvino", PEERS_EXTRA, purpose) from err
    try:
        import nncf
    except ImportError as err:
        raise MissingDependencyError("nncf", PEERS_EXTRA, purpose) from err
    return nncf


def fp32_onnx_of(ref: EngineSpec) -> Path:
    """The FP32 ONNX file behind the reference engine: the file itself, or a compiled engine's source. For the
    source, the file of that name *beside the engine* comes first (a copied or moved build folder must not pull
    in the original folder's model), then the path the sidecar recorded; either must have the sha256 recorded at
    build time."""
    src = source_onnx(ref.path, ref.sidecar) or Path((ref.sidecar or {}).get("source_model") or "")
    if ref.precision != "fp32" or src.suffix != ".onnx" or not src.is_file():
        raise SedeployError(f"The peers need the FP32 ONNX model of the reference '{ref.name}' ({ref.precision}); "
                            f"'{src}' is not one.", fix="benchmark the FP32 artifact (model.fp32.onnx) with the "
                                                        "other engines, or name it with --reference")
    return src


def peer_calibration(fp32_onnx: Path, pp: Preprocess, folder: str | Path | None = None) -> tuple[np.ndarray, str]:
    """(N×3×S×S images, where they came from) for NNCF: ``folder`` when given (sedeploy's selection rule with its
    defaults), else exactly the images of the build recorded in ``manifest.json`` beside ``fp32_onnx``."""
    if folder is not None:
        root, paths = quantize.select_images(folder, quantize.DEFAULT_COUNT, 0)
        how = f"{len(paths)} images of {root} (sedeploy's selection: at most {quantize.DEFAULT_COUNT}, seed 0)"
    else:
        build = fp32_onnx.parent
        present = Manifest.present(build)
        calib = Manifest.read(build, alternative="the calibration folder with --peer-calib DIR").calibration \
            if present else None
        if not calib:
            raise SedeployError(f"No calibration record for the NNCF peer: '{build / MANIFEST}' "
                                f"{'has no calibration entry' if present else 'does not exist'}.",
                                expected=f"the {MANIFEST} of a `sedeploy build-engine --int8` run next to the "
                                         "FP32 ONNX, or a calibration folder",
                                fix="pass --peer-calib DIR (the images sedeploy calibrated on)")
        selected = int(calib["images"]) + len(calib.get("skipped") or [])
        root, paths = quantize.select_images(calib["folder"], selected, int(calib.get("seed", 0)))
        how = (f"the {len(paths)} images sedeploy calibrated on ({calib['folder']}, seed {calib.get('seed', 0)}, "
               f"from {MANIFEST})")
    images, loaded = load_batch(paths, pp, what=f"peer calibration folder '{root}'")
    return images, how


def nncf_int8(fp32_onnx: Path, images: np.ndarray, how: str = "the given images"):
    """``fp32_onnx`` quantized by ``nncf.quantize`` with NNCF's own defaults on ``images`` (N×3×S×S, one image
    per calibration sample): the OpenVINO + NNCF INT8 peer, as an ``openvino.Model`` in memory."""
    nncf = _require("The OpenVINO + NNCF INT8 peer")
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    log.info("NNCF: quantizing %s with its default preset on %s", Path(fp32_onnx).name, how)
    return nncf.quantize(model, nncf.Dataset([images[i:i + 1] for i in range(len(images))]))


def make_peers(ref: EngineSpec, pp: Preprocess, *, threads: int, calib: str | Path | None = None) -> list[Peer]:
    """The two peer rows for the reference's network (see the module docstring); runners not yet active."""
    nncf = _require("Benchmark peers (--peers: OpenVINO FP32 and OpenVINO + NNCF INT8)")
    import openvino as ov

    src = fp32_onnx_of(ref)
    images, how = peer_calibration(src, pp, calib)
    quantized = nncf_int8(src, images, how)
    shared = {"meta": dict(ref.meta), "input_shape": ref.input_shape, "num_classes": ref.num_classes,
              "max_batch": ref.static_batch}
    # the same runner settings as sedeploy's own OpenVINO engines, static batch compilation included
    fp32_about = (f"OpenVINO {ov.get_version()} reading {src.name} directly (f32, LATENCY, {threads} threads, "
                  "compiled per batch size)")
    nncf_about = (f"nncf.quantize (NNCF {nncf.__version__}, default preset and subset size) of {src.name} on "
                  f"{how}; run by OpenVINO {ov.get_version()} (f32 for non-quantized parts, LATENCY, {threads} "
                  "threads, compiled per batch size)")
    return [
        Peer(EngineSpec(name=PEER_FP32, path=src, backend="openvino", precision="fp32", flavour="peer", **shared),
             OpenVinoModelRunner(src, precision="fp32", label=PEER_FP32, threads=threads), fp32_about),
        Peer(EngineSpec(name=PEER_NNCF, path=src, backend="openvino", precision="int8", flavour="peer: nncf",
                        **shared),
             OpenVinoModelRunner(quantized, precision="int8", label=PEER_NNCF, threads=threads), nncf_about),
    ]
