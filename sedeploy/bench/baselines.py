"""The rows a benchmark times beside the engines: PyTorch eager FP32 of the same network, and the same depth and
width without SE.

The PyTorch baseline (:func:`torch_baseline`) is rebuilt from the reference engine's metadata (or a checkpoint)
and accepted only when its logits match the FP32 reference engine: a baseline of another network would make the
speed ratio a lie. The plain model (:func:`plain_engine`, ``bench --compare-plain``) has random weights: it is
timed, never scored. torch is imported only when one of them is made.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from sedeploy.backends import Runner
from sedeploy.backends.ort import OrtRunner
from sedeploy.bench.engines import EngineSpec, load_light, source_onnx, stem_width
from sedeploy.bench.report import EngineInfo
from sedeploy.errors import SedeployError
from sedeploy.export import export_onnx
from sedeploy.onnxcore import META, default_opset

__all__ = ["TORCH_NAME", "TorchRunner", "torch_baseline", "plain_engine", "torch_threads"]

#: the PyTorch baseline's row name
TORCH_NAME = "pytorch-eager-fp32"
#: the weights metadata of a randomly initialised export, with its seed
RANDOM_WEIGHTS = re.compile(r"^random \(seed (\d+)\)$")


class TorchRunner(Runner):
    """PyTorch eager FP32, channels_last, under ``inference_mode`` — the baseline the engines are compared with."""

    backend = "pytorch"
    timer_coverage = ("PyTorch eager forward, channels_last: host numpy in (NCHW → channels_last copy "
                      "included) → host numpy out")
    input_dtype = np.dtype(np.float32)

    def __init__(self, model):
        import torch

        super().__init__()
        self.model = model.eval().to(memory_format=torch.channels_last)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=torch.channels_last)
            return self.model(t).numpy()


def torch_baseline(reference: EngineSpec, check_images: np.ndarray, reference_logits: np.ndarray, *,
                   checkpoint: str | None = None) -> tuple[TorchRunner | None, str]:
    """(runner, description) of the reference's network in PyTorch, or (None, the reason it cannot be made).

    From ``checkpoint`` when given (a mismatch with the engines is then an error: the user named the wrong
    file), else rebuilt from the metadata of a randomly initialised export (depth, SE, classes, width, seed).
    Either way its logits on ``check_images`` must match ``reference_logits``.
    """
    meta = reference.meta
    depth = meta.get(META.DEPTH)
    if checkpoint is not None:
        from sedeploy.checkpoints import load_checkpoint, weights_label

        loaded = load_checkpoint(checkpoint, depth=depth, num_classes=reference.num_classes)
        model, source = loaded.model, weights_label(loaded)
    else:
        if depth is None:
            return None, (f"the reference {reference.name} carries no sedeploy model metadata (not exported by "
                          "sedeploy), so its PyTorch network cannot be rebuilt; pass a checkpoint to time it")
        weights = str(meta.get(META.WEIGHTS, ""))
        match = RANDOM_WEIGHTS.match(weights)
        if not match:
            return None, (f"{reference.name} was exported from {weights or 'unrecorded weights'}; pass that "
                          "checkpoint to time the PyTorch baseline")
        width = stem_width(reference)
        if width is None:
            return None, f"the stem width of {reference.name} cannot be read from an ONNX graph"
        from sedeploy.model import build_model, count_params

        model = build_model(int(depth), se=bool(meta.get(META.SE, True)),
                            num_classes=int(reference.num_classes or meta.get(META.NUM_CLASSES, 1000)),
                            base_channels=width, style=str(meta.get(META.BLOCK_STYLE, "pytorch")),
                            seed=int(match.group(1)))
        params = meta.get(META.PARAMS)
        if params is not None and count_params(model) != params:
            return None, (f"the rebuilt {model.spec.name} has {count_params(model)} parameters, the engines' "
                          f"model {params}")
        source = f"{model.spec.name}, {weights}, rebuilt from the ONNX metadata"
    runner = TorchRunner(model).activate()
    got = runner.infer(check_images.astype(np.float32))
    ref = np.asarray(reference_logits, np.float64)
    diff = float(np.abs(got - ref).max())
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:
        what = (f"the PyTorch network ({source}) differs from the reference engine {reference.name} by max "
                f"|Δlogit| {diff:.3g} (> {tol:.2g}) on {len(check_images)} images")
        if checkpoint is not None:
            raise SedeployError(f"The checkpoint does not match the engines: {what}.",
                                fix="pass the checkpoint the engines were exported from, or leave it out")
        return None, what
    return runner, f"{source}; matches {reference.name} to max |Δlogit| {diff:.2g}"


def plain_engine(ref: EngineSpec, tmp: Path, threads: int) -> tuple[Any, EngineInfo] | str:
    """The same depth and width without SE, exported FP32 into ``tmp``; or the reason it cannot be made."""
    from sedeploy.flops import count_complexity
    from sedeploy.model import build_model

    depth = ref.meta.get(META.DEPTH)
    if depth is None:
        return f"the reference {ref.name} carries no depth metadata (not exported by sedeploy)"
    width = stem_width(ref)
    if width is None:
        return f"the stem width of {ref.name} cannot be read from its ONNX graph (not found beside the engine)"
    proto = load_light(source_onnx(ref.path, ref.sidecar))
    # the reference's opset, so both graphs come from the same exporter (dynamo ≥ 18, TorchScript below)
    opset = default_opset(proto) or 18
    net = build_model(int(depth), se=False, num_classes=int(ref.num_classes or 1000), base_channels=width, seed=0)
    size = ref.input_size or 224
    path = export_onnx(net, tmp / f"{net.spec.name}.onnx", input_size=size, opset=max(13, min(opset, 18)))
    cx = count_complexity(net, size)
    runner = OrtRunner(path, threads=threads).activate()
    name = f"{net.spec.name}-plain-fp32"
    info = EngineInfo(name=name, model=net.spec.name, precision="fp32", gflops_total=cx.total_gflops,
                      depth=int(depth), flavour="no-SE", backend="ort", device="cpu",
                      gflops_seed=cx.seed_macs / 1e9,
                      info={"path": "(temporary)", "flops_source": "sedeploy.flops", "runner": runner.describe(),
                            "opset": max(13, min(opset, 18)), "note": "random weights: timed only, no accuracy"})
    return runner, info


@contextlib.contextmanager
def torch_threads(threads: int):
    """PyTorch's intra-op threads set to ``threads`` for the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
