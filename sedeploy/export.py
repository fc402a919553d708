"""PyTorch → one self-contained, checked and *verified* ONNX file.

Default opset 18 through ``torch.onnx.export(dynamo=True)``: the exporter PyTorch maintains (the TorchScript one
is deprecated since torch 2.9), and 18 is the lowest opset it emits (its down-conversion to 17 fails). Opset 18 is
read by ONNX Runtime ≥ 1.14 and by TensorRT 10 / 11's ONNX parser. Opsets 13–17 are still available for older
runtimes: they go through the legacy TorchScript exporter, and the result says ``exporter: torchscript``.
Below 13 there is no per-channel QuantizeLinear/DequantizeLinear, which the INT8 artifacts need.

The two exporters write SE squeezes differently (dynamo: ``ReduceMean`` over H,W; TorchScript:
``GlobalAveragePool``); the SE fusion pass in :mod:`sedeploy.passes` accepts both.

Verification is part of export: the file is written to a temporary path, run in ONNX Runtime on real images and
on random input, compared with PyTorch, and renamed into place only when max |Δlogit| is within tolerance.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy import __version__
from sedeploy.errors import SedeployError, VerificationError
from sedeploy.fsutil import atomic_path, clean_stale_partials, disk_full_error, is_disk_full, require_utf8_path
from sedeploy.onnxcore import META, cpu_session, get_metadata, load_onnx, pad_to_batch, set_metadata, sha256_file
from sedeploy.preprocess import Preprocess, load_folder, smooth_noise

log = logging.getLogger("sedeploy")

DEFAULT_OPSET = 18
MIN_OPSET = 13
#: The exporter changes at 18: dynamo below 18 cannot be produced (its down-conversion fails).
DYNAMO_MIN_OPSET = 18
#: Verification bound: max |Δlogit| ≤ atol + rtol · max|logit|. FP32 carries ~7 significant digits, and the
#: rounding of two different kernel libraries (PyTorch, ONNX Runtime) accumulates with depth and scales with the
#: logits: with random weights on the calib/ photos, max |Δlogit| measured 6e-5 (-50), 8e-5 (-101) and 1.8e-4
#: (-152, whose logits there reach ±175). For logits within ±25 the bound is ≤ 2e-4.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 4e-6
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_CALIB_DIR = Path(__file__).resolve().parent.parent / "calib"
#: largest --input-size accepted: ~13× ImageNet's side; one SE-ResNet-50 image then needs ~10 GiB of activations
MAX_INPUT_SIZE = 2048
#: Per-node ``metadata_props`` keys the exporter writes that hold file locations (the Python source lines each node
#: came from, with absolute paths of the checkout and of site-packages): the same network exported from two
#: checkouts would differ in bytes. They are dropped; the node names and the module scopes
#: (``namespace``, ``pkg.torch.onnx.name_scopes``, ``pkg.torch.onnx.class_hierarchy``) stay.
LOCATION_METADATA_KEYS = frozenset({"pkg.torch.onnx.stack_trace"})


@dataclass
class Verification:
    images: int
    random_inputs: int
    max_abs_diff: float
    max_abs_diff_random: float
    top1_agreement: float  # fraction of real images whose top-1 class is identical
    distinct_top1: int  # how many different classes the real images produced (a degenerate net gives 1)
    atol: float
    image_folder: str
    rtol: float = 0.0
    logit_scale: float = 0.0  # max |logit| of the PyTorch reference on the real images
    logit_scale_random: float = 0.0  # … on the random inputs

    @property
    def tolerance(self) -> float:
        """The bound on the real images (each input set is held to its own logit scale)."""
        return self.atol + self.rtol * self.logit_scale

    @property
    def tolerance_random(self) -> float:
        return self.atol + self.rtol * self.logit_scale_random

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.max_abs_diff_random <= self.tolerance_random


@dataclass
class ExportResult:
    path: str
    model: str
    depth: int
    params: int
    flops: int  # mmcls seed convention (multiply-adds, backbone + neck)
    total_macs: int
    opset: int
    exporter: str
    dynamic_batch: bool
    batch_size: int | None
    input_size: int
    num_classes: int
    weights: str
    sha256: str
    seconds: float
    verification: Verification | None = None
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        v = d.pop("verification")
        if v:
            d.update(max_abs_diff=v["max_abs_diff"], max_abs_diff_random=v["max_abs_diff_random"],
                     top1_agreement=v["top1_agreement"],
                     verification={**v, "tolerance": self.verification.tolerance,
                                   "tolerance_random": self.verification.tolerance_random})
        return d


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise SedeployError(
            f"Opset {opset} is not supported for SE-ResNet export.",
            expected=f"an opset from {MIN_OPSET} to {newest} (default {DEFAULT_OPSET}); opsets below {MIN_OPSET} lack "
                     "per-channel QuantizeLinear/DequantizeLinear, which INT8 artifacts need",
            fix=f"pass --opset {DEFAULT_OPSET}")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters warn about deprecations and absent torchvision ops; none of it concerns our network."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def strip_location_metadata(proto) -> int:
    """Drop :data:`LOCATION_METADATA_KEYS` from every node (subgraphs and local functions included), so the file's
    bytes do not depend on where sedeploy or torch is installed. Returns how many entries were dropped."""
    import onnx

    dropped = 0

    def nodes(graph):
        for node in graph.node:
            yield node
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from nodes(g)

    for node in [*nodes(proto.graph), *(n for f in proto.functions for n in f.node)]:
        keep = [p for p in node.metadata_props if p.key not in LOCATION_METADATA_KEYS]
        if len(keep) != len(node.metadata_props):
            dropped += len(node.metadata_props) - len(keep)
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    return dropped


def export_onnx(model, path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, batch_size: int = 1,
                input_size: int = 224, metadata: dict | None = None) -> Path:
    """Export ``model`` (N×3×S×S → logits) to ``path`` as one self-contained ONNX file, checked in full.

    Inputs are named ``input``/``logits``; with ``dynamic_batch`` the batch dimension is symbolic ("batch").
    ``metadata`` goes into the model's metadata_props (values JSON-encoded when not strings). The exporter's
    per-node source locations are dropped (:func:`strip_location_metadata`): the bytes depend only on the network,
    the options and the library versions, not on where the checkout is.
    """
    import onnx
    import torch

    _check_opset(opset)
    if batch_size < 1:
        raise SedeployError(f"Batch size {batch_size} is not valid.", expected="a positive integer",
                            fix="pass --batch-size 1, or --dynamic-batch")
    path = Path(path)
    x = torch.from_numpy(smooth_noise(batch_size if not dynamic_batch else 2, input_size, seed=0))
    kw: dict = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False)
    if opset >= DYNAMO_MIN_OPSET:
        kw.update(dynamo=True, external_data=False, optimize=True)
        if dynamic_batch:
            kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    else:
        kw.update(dynamo=False, do_constant_folding=True)
        if dynamic_batch:
            kw["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with atomic_path(path) as tmp:
        try:
            with _quiet_exporter(), torch.no_grad():
                torch.onnx.export(model.eval(), (x,), str(tmp), **kw)
        except Exception as err:  # the exporters raise many unrelated types; re-raise as one clear error
            if is_disk_full(err):
                raise disk_full_error(path, err) from err
            raise SedeployError(f"torch.onnx.export failed at opset {opset}: {type(err).__name__}: {err}",
                                fix=f"try the default --opset {DEFAULT_OPSET}") from err
        proto = onnx.load(str(tmp), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise SedeployError("The exporter wrote weights to an external data file; sedeploy needs one file.")
        strip_location_metadata(proto)
        set_metadata(proto, metadata or {})
        onnx.save(proto, str(tmp))
        stray = tmp.with_name(tmp.name + ".data")
        if stray.exists():
            stray.unlink()
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def read_metadata(path) -> dict:
    """sedeploy's metadata from an ONNX file (JSON values decoded)."""
    return get_metadata(load_onnx(path, weights=False, check=False))


def verify_onnx(model, onnx_path, *, images: np.ndarray, image_folder: str = "", atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, batch_size: int | None = None, random_inputs: int = 2, seed: int = 0) -> Verification:
    """Run ``onnx_path`` in ONNX Runtime (CPU) and ``model`` in PyTorch on the same inputs; compare logits."""
    import torch

    sess = cpu_session(onnx_path)
    size = images.shape[-1]
    noise = smooth_noise(random_inputs, size, seed=seed + 1) if random_inputs else images[:0]

    def both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = batch_size or len(x) or 1
        ref, got = [], []
        for i in range(0, len(x), step):
            chunk = pad_to_batch(x[i:i + step], batch_size or None)  # a fixed-batch model: pad the last chunk
            with torch.no_grad():
                ref.append(model(torch.from_numpy(chunk)).numpy()[: len(x) - i])
            got.append(sess.run(None, {sess.get_inputs()[0].name: chunk})[0][: len(x) - i])
        return np.concatenate(ref), np.concatenate(got)

    ref, got = both(images)
    diff = float(np.abs(ref - got).max())
    diff_rand, scale_rand = 0.0, 0.0
    if random_inputs:
        r2, g2 = both(noise)
        diff_rand, scale_rand = float(np.abs(r2 - g2).max()), float(np.abs(r2).max())
    return Verification(images=len(images), random_inputs=random_inputs, max_abs_diff=diff,
                        max_abs_diff_random=diff_rand,
                        top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean()),
                        distinct_top1=len(set(ref.argmax(1).tolist())), atol=atol, image_folder=image_folder,
                        rtol=rtol, logit_scale=float(np.abs(ref).max()), logit_scale_random=scale_rand)


def check_export_options(*, depth: int | None = None, input_size: int = 224, num_classes: int | None = None,
                         atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, batch_size: int = 1) -> None:
    """The export options a user types, checked before anything is built (each error names its option)."""
    from sedeploy.model import ARCH

    if depth is not None and depth not in ARCH:
        raise SedeployError(f"--depth {depth} is not a supported depth.",
                            expected=f"one of {', '.join(map(str, sorted(ARCH)))}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or not 32 <= input_size <= MAX_INPUT_SIZE:
        raise SedeployError(f"--input-size {input_size} is not valid.",
                            expected=f"a square input size in pixels from 32 to {MAX_INPUT_SIZE} (five stride-2 "
                                     "stages need ≥ 32; ImageNet models use 224)",
                            fix="omit --input-size for 224")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise SedeployError(f"--num-classes {num_classes} is not valid.", expected="a positive number of classes",
                            fix="omit --num-classes for 1000 (ImageNet), or the checkpoint's head size")
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
            raise SedeployError(f"{name} {value} is not valid: a tolerance is a bound on |Δlogit| and cannot be "
                                "negative or infinite.", expected="a finite number ≥ 0",
                                fix=f"omit {name} (default {DEFAULT_ATOL if name == '--atol' else DEFAULT_RTOL:g})")
    if batch_size < 1:
        raise SedeployError(f"--batch-size {batch_size} is not valid.", expected="a positive integer",
                            fix="omit --batch-size for a dynamic batch")


def export_model(*, depth: int | None = None, checkpoint: str | None = None, output: str | Path | None = None,
                 opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, batch_size: int = 1, input_size: int = 224,
                 num_classes: int | None = None, se: bool = True, verify_images: str | Path | None = None,
                 verify_limit: int | None = 32, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 seed: int = 0, base_channels: int = 64, progress: bool = False) -> ExportResult:
    """The `sedeploy export` job: build (or load) the network, export, verify, and only then publish the file.

    ``depth=None``: the checkpoint's depth with ``checkpoint``, else 50. ``progress``: a stage bar on stderr."""
    from tqdm import tqdm

    from sedeploy import model as M
    from sedeploy.flops import count_complexity

    t0 = time.perf_counter()
    check_export_options(depth=depth, input_size=input_size, num_classes=num_classes, atol=atol, rtol=rtol,
                         batch_size=batch_size)
    _check_opset(opset)
    if output is not None:
        require_utf8_path(output, "output file (-o)")
    if output is not None and Path(output).is_dir():
        raise SedeployError(f"The output '{output}' is a folder.", expected="an .onnx file path",
                            fix=f"pass a file name, e.g. -o {Path(output) / 'model.onnx'}")
    pp = Preprocess.for_size(input_size)
    folder = Path(verify_images) if verify_images else DEFAULT_CALIB_DIR
    images, _ = load_folder(folder, pp, limit=verify_limit, what="verification image folder (--verify-images)"
                            if verify_images else "shipped verification image folder")
    bar = tqdm(total=3, desc="Export", unit="step", disable=not progress, leave=False,
               bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")
    bar.set_postfix_str("building the network")

    if checkpoint:
        from sedeploy.checkpoints import load_checkpoint, weights_label

        loaded = load_checkpoint(checkpoint, depth=depth, num_classes=num_classes)
        net, spec, weights = loaded.model, loaded.spec, weights_label(loaded)
    else:
        net = M.build_model(depth or 50, se=se, num_classes=num_classes or 1000, base_channels=base_channels, seed=seed)
        spec, weights = net.spec, f"random (seed {seed})"
    cx = count_complexity(net, input_size)
    output = Path(output) if output else Path(f"{spec.name}.onnx")
    metadata = {
        META.MODEL: spec.name, META.DEPTH: spec.depth, META.SE: spec.se,
        META.NUM_CLASSES: spec.num_classes, META.PARAMS: cx.params, META.FLOPS: cx.seed_macs,
        META.TOTAL_MACS: cx.total_macs, META.INPUT_SIZE: input_size,
        META.PREPROCESS: pp.as_dict(), META.WEIGHTS: weights,
        META.BLOCK_STYLE: spec.style, META.PRECISION: "fp32",
    }
    metadata[META.VERSION] = __version__
    # Export to a temporary name, verify, then rename: a failed verification leaves nothing behind. Partial files
    # of this name that killed runs (SIGKILL) left behind are removed first.
    clean_stale_partials(output.parent if str(output.parent) else Path("."), final_name=output.name, locked=False)
    with atomic_path(output) as staged, bar:
        bar.update()
        bar.set_postfix_str(f"torch.onnx.export (opset {opset})")
        export_onnx(net, staged, opset=opset, dynamic_batch=dynamic_batch, batch_size=batch_size,
                    input_size=input_size, metadata=metadata)
        bar.update()
        bar.set_postfix_str("verifying against PyTorch")
        ver = verify_onnx(net, staged, images=images, image_folder=str(folder), atol=atol, rtol=rtol,
                          batch_size=None if dynamic_batch else batch_size, seed=seed)
        if not ver.passed:
            raise VerificationError(
                f"ONNX Runtime disagrees with PyTorch: max |Δlogit| {ver.max_abs_diff:.3g} on the images (tolerance "
                f"{ver.tolerance:.3g} = {atol:g} + {rtol:g} × max|logit| {ver.logit_scale:.3g}), "
                f"{ver.max_abs_diff_random:.3g} on random input (tolerance {ver.tolerance_random:.3g}); top-1 "
                f"agreement {ver.top1_agreement:.1%}. The .onnx was not written.",
                fix="--atol/--rtol relax the check if you accept the error; if the defaults fail on the shipped "
                    "images, report it as a bug with the command line")
        sha = sha256_file(staged)
    return ExportResult(path=str(output), model=spec.name, depth=spec.depth, params=cx.params, flops=cx.seed_macs,
                        total_macs=cx.total_macs, opset=opset,
                        exporter="dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript",
                        dynamic_batch=dynamic_batch, batch_size=None if dynamic_batch else batch_size,
                        input_size=input_size, num_classes=spec.num_classes, weights=weights, sha256=sha,
                        seconds=round(time.perf_counter() - t0, 2), verification=ver, metadata=metadata)
