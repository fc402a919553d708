"""INT8 calibration: run an FP32 ONNX model on real images and record the range of every activation.

One :class:`CalibrationResult` (tensor name → (lo, hi)) feeds every INT8 flavour in :mod:`sedeploy.quantize`:
the symmetric TensorRT one uses ``max(|lo|, |hi|)``, the asymmetric uint8 CPU one uses ``(lo, hi)``, the OpenVINO one
either, by sign (symmetric int8 where ``lo < 0``, uint8 from 0 otherwise).

The range methods (``minmax``, ``entropy``, ``percentile``, ``mse``) are described and implemented in
:mod:`sedeploy.quantize.estimators`.

The histograms are sedeploy's own (numpy), not ``onnxruntime.quantization``'s calibrators. ORT's
``HistogramCalibrater`` keeps every intermediate output of every image in memory before binning (gigabytes for
SE-ResNet-50 at 224 px), its default entropy settings (128 bins, 128 quantised bins) evaluate a single candidate
threshold, i.e. they reduce to min/max, and with TensorRT's 2048 bins its pure-Python KL loop takes about a second
per tensor. Here each batch is binned as soon as it comes out of ONNX Runtime, on a grid of 2048 bins over
[0, 2^k] that is re-binned (adjacent pairs merged, which is exact) when a larger value appears; the final histogram
is therefore the same whatever the batch size or image order.

Results are cached as JSON under a key that hashes everything the ranges depend on (model bytes, the chosen
images and their contents, preprocessing, method and its parameters, count, seed, this module's
:data:`CALIBRATION_VERSION`). A cached file is used only when its stored key equals the current one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_write_text
from sedeploy.fsutil import cache_dir as user_cache_dir
from sedeploy.onnxcore import cpu_session, image_input, load_onnx, pad_to_batch, sha256_file
from sedeploy.preprocess import Preprocess, find_images, load_batch
from sedeploy.quantize.estimators import DEFAULT_PERCENTILE, METHODS, TensorStats, method_params

log = logging.getLogger("sedeploy")

#: Bump whenever the ranges computed for the same inputs change (new histogram code, new defaults…):
#: it is part of the cache key, so old cache entries stop matching instead of being reused.
CALIBRATION_VERSION = 5  # 3: per-channel means of the weighted layers' inputs; 4: mse thresholds on the uint8 grid; 5: a content checksum
GRIDS = ("int8", "uint8")
#: mse by measurement on three trained reference SE-ResNet-50 checkpoints (benchmarks/results/reference_int8/ and its
#: earlier-checkpoints/: 256 Imagenette train images, top-1 agreement with FP32 on the 3,925 val images): ONNX Runtime
#: CPU flavour mse against percentile 99.99 — 99.01 vs 98.47 % (val-70.4 checkpoint), 98.14 vs 96.38 % (val-69.9),
#: 98.01 vs 97.40 % (val-72.7); OpenVINO flavour 99.11 vs 98.73 %, 98.62 vs 96.69 %, 98.55 vs 97.58 %. On the small tiny/foreign test networks
#: (benchmarks/results/int8_calibration/) the two tie within one or two of 300–500 images. entropy clips harder,
#: which the symmetric TensorRT form tolerates and the uint8 CPU form does not (tiny network: 87.2 % CPU).
DEFAULT_METHOD = "mse"
#: At most this many images are used (a seeded random subset when the folder holds more).
DEFAULT_COUNT = 256
DEFAULT_BATCH_SIZE = 8
#: Fewest images each method accepts. min/max is defined for any sample. The histogram methods estimate a tail
#: threshold, and the smallest tensors (SE bottleneck vectors: C/16 values per image, 16 for layer1) hold only
#: a few hundred values from 16 images — below that a histogram tail is noise. (A judgement, not a measurement.)
MIN_IMAGES = {"minmax": 1, "entropy": 16, "percentile": 16, "mse": 16}
CACHE_FORMAT = "sedeploy-calibration"


def _content_sha256(d: dict) -> str:
    """Checksum of a cache entry's contents: a range edited or damaged after the run that computed it (zeroed,
    say) is not trusted, whatever the key says."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclass
class CalibrationResult:
    """Activation ranges of one model on one image set. ``ranges[name] = (lo, hi)``, floats, lo ≤ 0 ≤ hi not
    guaranteed (a post-ReLU tensor has lo = 0)."""

    ranges: dict[str, tuple[float, float]]
    method: str
    params: dict
    images: list[str]  # paths relative to the image folder, in the order used
    key: str
    cache_hit: bool
    seconds: float
    model_sha256: str = ""
    preprocess: dict = field(default_factory=dict)
    count: int = 0
    seed: int = 0
    skipped: list[str] = field(default_factory=list)  # selected files that could not be decoded
    cache_path: str | None = None
    #: per-channel mean (axis 1) of every Conv/Gemm data input over the calibration images — what weight-
    #: quantization bias correction needs (sedeploy.quantize.bias)
    channel_means: dict[str, list[float]] = field(default_factory=dict)
    #: ranges of the non-negative tensors for a uint8 grid (255 levels over [0, hi]; the CPU and OpenVINO
    #: flavours), where the threshold depends on the grid (``mse``); empty for the other methods
    uint8_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: the folder ``images`` are relative to, known when :func:`calibrate` made or found this result (not stored in
    #: the cache: a file may be read where that folder is elsewhere); measured bias correction reads the images
    image_root: str | None = None

    def amax(self, name: str) -> float:
        """Symmetric range of one tensor (what TensorRT-style int8 uses)."""
        lo, hi = self.ranges[name]
        return max(abs(lo), abs(hi))

    def ranges_for(self, grid: str) -> dict[str, tuple[float, float]]:
        """Every tensor's range for a quantization grid: ``"int8"`` (symmetric, 127 levels a side: every tensor of
        the TensorRT flavour) or ``"uint8"`` (a non-negative tensor on 255 levels over [0, hi], as the CPU and
        OpenVINO flavours store post-ReLU tensors). The mse threshold of a tensor is the one that minimises the
        error on the grid it will be rounded to: on the uint8 grid each step is half as wide, so less is clipped."""
        if grid not in GRIDS:
            raise SedeployError(f"Unknown quantization grid {grid!r}.", expected=f"one of {', '.join(GRIDS)}")
        return {**self.ranges, **self.uint8_ranges} if grid == "uint8" else dict(self.ranges)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cache_hit")
        d.pop("cache_path")
        d.pop("image_root")
        d["ranges"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ranges.items()}
        d["uint8_ranges"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.uint8_ranges.items()}
        d = {"format": CACHE_FORMAT, "version": CALIBRATION_VERSION, **d}
        return {**d, "content_sha256": _content_sha256(d)}

    @classmethod
    def from_dict(cls, d: dict, *, cache_hit: bool = False, cache_path: str | None = None) -> "CalibrationResult":
        if d.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a {CACHE_FORMAT} file")
        if d.get("version") != CALIBRATION_VERSION or d.get("method") not in METHODS:
            raise ValueError(f"version {d.get('version')!r} / method {d.get('method')!r}, not {CALIBRATION_VERSION} / "
                             f"one of {', '.join(METHODS)}")
        stored = d.get("content_sha256")
        if stored != _content_sha256({k: v for k, v in d.items() if k != "content_sha256"}):
            raise ValueError("its contents do not match the checksum it was written with (edited or damaged)")
        for table in ("ranges", "uint8_ranges"):
            bad = [k for k, v in (d.get(table) or {}).items()
                   if not (len(v) == 2 and all(math.isfinite(float(x)) for x in v) and float(v[0]) <= float(v[1]))]
            if bad:
                raise ValueError(f"{table} of {bad[:3]} are not finite [low, high] pairs")
        return cls(ranges={k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()}, method=d["method"],
                   params=dict(d["params"]), images=list(d["images"]), key=d["key"], cache_hit=cache_hit,
                   seconds=float(d["seconds"]), model_sha256=d["model_sha256"], preprocess=dict(d["preprocess"]),
                   count=int(d["count"]), seed=int(d["seed"]), skipped=list(d.get("skipped", [])),
                   cache_path=cache_path,
                   channel_means={k: [float(x) for x in v] for k, v in d.get("channel_means", {}).items()},
                   uint8_ranges={k: (float(v[0]), float(v[1])) for k, v in d.get("uint8_ranges", {}).items()})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationResult":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(d, dict):
                raise TypeError(f"it holds a JSON {type(d).__name__}, not an object")
            return cls.from_dict(d, cache_hit=True, cache_path=str(path))
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise SedeployError(f"'{path}' is not a readable sedeploy calibration file ({err}).",
                                fix="recalibrate (sedeploy calibrate …) or pass the right file") from err


# --------------------------------------------------------------------------------------------------------------
# Cache key


def default_cache_dir() -> Path:
    """``$SEDEPLOY_CACHE/calib`` when SEDEPLOY_CACHE is set, else ``~/.cache/sedeploy/calib``."""
    return user_cache_dir("calib")


def calibration_key(*, model_sha256: str, images: list[tuple[str, str]], preprocess: Preprocess, method: str,
                    params: dict, count: int, seed: int) -> str:
    """sha256 over everything the ranges depend on. ``images`` = [(relative path, content sha256)] in use order."""
    payload = {
        "version": CALIBRATION_VERSION,
        "model_sha256": model_sha256,
        "images": sorted([list(x) for x in images]),
        "preprocess": preprocess.as_dict(),
        "method": method,
        "params": params,
        "count": count,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Running the model


def activation_tensors(model) -> list[str]:
    """The tensors that get a calibration range: every float tensor a node computes from the image, plus the
    graph's float image input. Integer tensors (shape arithmetic, pad vectors) and tensors computed from
    constants only (a Reshape of a weight) never do: they are no activations, whatever the exporter left
    unfolded. The one definition calibration and every INT8 flavour's range check use."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model  # types of the declared inputs/outputs only; the rest is judged by its producer
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    constant = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    names = [i.name for i in model.graph.input if i.name not in constant and types.get(i.name) in floats]
    for node in model.graph.node:
        if node.op_type == "Constant" or all(not i or i in constant for i in node.input):
            constant.update(node.output)  # computed from constants only (a node with no inputs too)
            continue
        names += [o for o in node.output if o and types.get(o) in floats]
    return list(dict.fromkeys(names))


def _model_input(model, pp: Preprocess):
    """The model's image input (must be float32 and match the preprocessing's size)."""
    inp = image_input(model, path="the model to calibrate")
    if inp.elem_type != 1:
        raise SedeployError(f"The model input '{inp.name}' is not float32; calibration needs the FP32 model.",
                            fix="calibrate the FP32 .onnx (before FP16/INT8 conversion)")
    if (inp.height, inp.width) != pp.shape:
        raise SedeployError(
            f"The model expects {inp.height}×{inp.width} images but preprocessing makes {pp.shape[0]}×{pp.shape[1]}.",
            fix=f"use Preprocess.for_size({inp.height}, width={inp.width}) (CLI: --input-size {inp.height})")
    return inp


def _collect(model_path: Path, images: np.ndarray, method: str, params: dict, batch_size: int, pp: Preprocess,
             progress: bool, names: list[str] | None = None) -> tuple[dict, dict, dict[str, list[float]]]:
    """(ranges, uint8 ranges of the non-negative tensors where the grid matters, per-channel input means)."""
    import onnx
    from tqdm import tqdm

    model = load_onnx(model_path, check=False)
    inp = _model_input(model, pp)
    fixed = inp.static_batch  # a fixed-batch model is fed exactly that many images per call
    image_names = names
    names = activation_tensors(model)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    # Full optimisation is safe here: ORT keeps every graph output (a fused Conv+Relu still yields the exposed
    # Conv output), values match ORT_DISABLE_ALL to ~3e-6 relative, and it runs ~3.5× faster than BASIC.
    sess = cpu_session(model, optimization="all")
    out_names = [o.name for o in sess.get_outputs()]
    wanted = set(names)
    stats = {n: TensorStats(histogram=method != "minmax") for n in names}
    inits = {t.name for t in model.graph.initializer}
    fc_inputs = {n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1
                 and n.input[1] in inits and n.input[0] in wanted}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    step = fixed or batch_size
    batches = range(0, len(images), step)
    for start in tqdm(batches, desc=f"Calibrating ({method})", unit="batch", disable=not progress, leave=False):
        chunk = images[start:start + step]
        n = len(chunk)
        # a short last chunk is padded to the fixed batch; the copies' activations are cut off again below
        outs = sess.run(out_names, {inp.name: pad_to_batch(chunk, fixed)})
        for name, arr in zip(out_names, outs):
            if name in existing and not np.all(np.isfinite(arr[:n])):  # the model's own output, before any INT8
                rows = np.flatnonzero(~np.isfinite(arr[:n].reshape(n, -1)).all(axis=1)) + start
                shown = [image_names[i] if image_names else f"#{i}" for i in rows[:3]]
                raise SedeployError(f"The FP32 model '{model_path}' itself outputs NaN/inf on calibration image(s) "
                                    f"{', '.join(shown)}{' …' if len(rows) > 3 else ''} (before any quantization): "
                                    "the model is broken on these inputs, not its INT8 conversion.",
                                    expected="finite outputs on every calibration image",
                                    fix="check the model's weights and its preprocessing (--mean/--std), or leave "
                                        "such images out of --calib")
        for name, arr in zip(out_names, outs):
            if name in wanted:
                a = arr[:n] if fixed and arr.ndim and arr.shape[0] == fixed else arr
                stats[name].update(a)
                if name in fc_inputs and a.ndim >= 2:
                    per = a.astype(np.float64).sum(axis=(0, *range(2, a.ndim)))
                    sums[name] = sums.get(name, 0.0) + per
                    counts[name] = counts.get(name, 0) + a.size // a.shape[1]
        del outs
    means = {k: (sums[k] / counts[k]).tolist() for k in sums}
    uint8 = {n: r for n, s in stats.items() if (r := s.uint8_range(method, params)) is not None}
    return {n: s.range(method, params) for n, s in stats.items()}, uint8, means


# --------------------------------------------------------------------------------------------------------------
# Public entry point


def select_images(folder: str | os.PathLike, count: int | None, seed: int,
                  exclude: Collection[str] = ()) -> tuple[Path, list[Path]]:
    """The images calibration uses: all of ``folder`` when it holds ≤ ``count``, else a seeded random subset
    (returned in sorted order, so the selection is a set, not a sequence). ``exclude``: paths relative to the
    folder (POSIX) that are held out (the accuracy-budget split) and never calibrated on."""
    found = find_images(folder, what="calibration image folder")
    paths = found.paths
    if exclude:
        held = set(exclude)
        paths = [p for p in paths if p.relative_to(found.root).as_posix() not in held]
    if count is not None and len(paths) > count:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(paths), size=count, replace=False))
        paths = [paths[i] for i in keep]
    return found.root, paths


def _check_count(method: str, n: int, folder: Path, what: str) -> None:
    need = MIN_IMAGES[method]
    if n < need:
        others = ", ".join(f"{m} ≥ {k}" for m, k in MIN_IMAGES.items() if m != method)
        raise SedeployError(
            f"Calibration method '{method}' needs at least {need} images; {n} {what} in '{folder}'.",
            expected=f"{method} ≥ {need} images ({others}); a histogram threshold from fewer images is noise",
            fix=(f"raise --calib-count to ≥ {need}" if what.startswith("requested") else
                 f"add images to the folder (≥ {need})") + ", or use --calib-method minmax (any number of images)")


def calibrate(model_path: str | os.PathLike, image_folder: str | os.PathLike, *, method: str = DEFAULT_METHOD,
              count: int | None = DEFAULT_COUNT, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
              percentile: float = DEFAULT_PERCENTILE, cache_dir: str | os.PathLike | None = None,
              cache_path: str | os.PathLike | None = None, use_cache: bool = True, progress: bool = True,
              preprocess: Preprocess = Preprocess(), exclude: Collection[str] = ()) -> CalibrationResult:
    """Activation ranges of the FP32 model ``model_path`` on (a subset of) the images in ``image_folder``.

    ``count`` is the most images used (``None``: all); a folder with more gets a random subset drawn with ``seed``.
    The result is cached in ``cache_dir`` (default :func:`default_cache_dir`) as ``<key>.json``, or exactly at
    ``cache_path`` when given; a pinned file whose stored key differs from the current key is recomputed and
    overwritten (with a warning), never reused. ``batch_size`` changes speed and memory, not the result.
    ``exclude``: images (relative paths) held out for accuracy checks; they are never calibrated on.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise SedeployError(f"Unknown calibration method '{method}'.", expected=f"one of {', '.join(METHODS)}",
                            fix=f"pass --calib-method {DEFAULT_METHOD}")
    if count is not None and count < 1:
        raise SedeployError(f"Calibration image count {count} is not valid.", expected="a positive integer")
    if batch_size < 1:
        raise SedeployError(f"Calibration batch size {batch_size} is not valid.", expected="a positive integer")
    if method == "percentile" and not 50.0 < percentile <= 100.0:
        raise SedeployError(f"Percentile {percentile} is not valid.", expected="a value in (50, 100], e.g. 99.99")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise SedeployError(f"The model '{model_path}' does not exist.", fix="pass the FP32 .onnx from sedeploy export")
    if count is not None:
        _check_count(method, count, Path(image_folder), f"requested (count={count})")
    root, paths = select_images(image_folder, count, seed, exclude)
    _check_count(method, len(paths), root, "found")

    params = method_params(method, percentile)
    model_sha = sha256_file(model_path, what="model")
    rel = [p.relative_to(root).as_posix() for p in paths]
    key = calibration_key(model_sha256=model_sha, images=[(r, sha256_file(p, what="calibration image")) for r, p in zip(rel, paths)],
                          preprocess=preprocess, method=method, params=params, count=count or 0, seed=seed)
    target = Path(cache_path) if cache_path else (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{key}.json"

    if use_cache and target.is_dir():
        raise SedeployError(f"The calibration cache file '{target}' is a folder.",
                            fix="remove or rename that folder" + ("" if cache_path else ", or set SEDEPLOY_CACHE to "
                                                                  "another folder"))
    if use_cache and target.exists():
        try:
            cached = CalibrationResult.load(target)
        except SedeployError as err:
            if cache_path:  # a file the user named: never overwrite what is not a calibration file
                raise SedeployError(f"The calibration cache file (--calib-cache) '{target}' exists and is not a "
                                    f"sedeploy calibration file ({err.what}); it is not overwritten.",
                                    expected="a new file name, or a file written by an earlier --calib-cache run",
                                    fix="pass another --calib-cache path (e.g. calib-cache.json), or remove the "
                                        "file if it is a damaged cache") from err
            log.warning("Ignoring unreadable calibration cache %s (%s); recomputing.", target, err.what)
        else:
            if cached.key == key:
                log.info("Calibration cache hit: %s", target)
                cached.image_root = str(root)
                return cached
            log.warning("Calibration cache %s was made for different inputs (stored key %s…, current %s…): "
                        "recomputing and overwriting it.", target, cached.key[:12], key[:12])

    images, loaded = load_batch(paths, preprocess, progress=progress, what=f"calibration image folder '{root}'")
    skipped = sorted(set(rel) - {p.relative_to(root).as_posix() for p in loaded})
    _check_count(method, len(loaded), root, "could be decoded")
    ranges, uint8_ranges, means = _collect(model_path, images, method, params, batch_size, preprocess, progress,
                                           names=[p.relative_to(root).as_posix() for p in loaded])
    result = CalibrationResult(ranges=ranges, method=method, params=params,
                               images=[p.relative_to(root).as_posix() for p in loaded], key=key, cache_hit=False,
                               seconds=round(time.perf_counter() - t0, 3), model_sha256=model_sha,
                               preprocess=preprocess.as_dict(), count=count or 0, seed=seed, skipped=skipped,
                               channel_means=means, uint8_ranges=uint8_ranges, image_root=str(root))
    if use_cache:
        result.save(target)
        result.cache_path = str(target)
    return result
