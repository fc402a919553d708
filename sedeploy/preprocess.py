"""The one image pipeline: mmcls's test transform, used wherever images enter sedeploy.

mmcls test pipeline for SE-ResNet: load, resize the short side to 256 (bilinear), centre-crop 224, RGB,
subtract mean / divide by std on 0–255 pixels. Export verification, INT8 calibration and benchmarks all call
:func:`load_batch`, so the numbers they report are about the same input.

Other classifiers need other inputs, all recorded in :class:`Preprocess` (and so in every artifact's metadata):
a non-square crop (H×W: the image is scaled so it covers the crop's size scaled by resize/min(H, W), then
centre-cropped), BGR channel order, and the "fit height, pad width" resize of text classifiers (``resize_mode
"pad"``: resized to height H keeping the aspect ratio, width at most W, zero-padded on the right after
normalisation, as PaddleOCR does). Images are turned upright by their EXIF orientation first, as photo viewers and
mmcv's reader do. Arrays are N×3×H×W; :func:`layout_batch` lays a batch out for an input that is NHWC.

Folders may be flat (``calib/*.jpg``) or ImageFolder-style (``root/<class>/*.jpg``); :func:`find_images`
returns the class-folder name alongside each file so accuracy code can map it to a label.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy")

#: mmcls test pipeline normalisation, on 0–255 RGB pixels (the one place it is written: the model card and
#: the export read it from here, and importing it loads no torch).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
#: Companion files that commonly sit next to images; ignored without a warning.
QUIET_EXTENSIONS = {".md", ".txt", ".py", ".json", ".tsv", ".csv", ".yaml", ".yml"}


#: channel orders the pipeline can feed (the model's first input channel first)
CHANNEL_ORDERS = ("rgb", "bgr")
#: "crop": resize (short side) + centre crop, mmcls's test transform; "pad": resize to the height keeping the
#: aspect ratio, width at most the input's, zero-padded on the right (PaddleOCR's text classifiers)
RESIZE_MODES = ("crop", "pad")
#: an image is refused when resizing it would make more than this many times the crop's pixels (a 141-byte
#: 20000×1 PNG resized to a short side of 256 is 1.3 G pixels); a 64:1 panorama still passes
MAX_RESIZED_FACTOR = 64


@dataclass(frozen=True)
class Preprocess:
    """Resize-short-side → centre-crop → normalise. Defaults are mmcls's ImageNet test pipeline.

    ``size`` is the crop's height, ``width`` its width (None: square). ``mean``/``std`` are on 0–255 pixels, one
    per input channel in the model's channel order (B, G, R for ``channel_order="bgr"``)."""

    size: int = 224
    resize_short: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    width: int | None = None
    channel_order: str = "rgb"
    resize_mode: str = "crop"

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise SedeployError(f"Channel order '{self.channel_order}' is not valid.",
                                expected=f"one of {', '.join(CHANNEL_ORDERS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise SedeployError(f"Resize mode '{self.resize_mode}' is not valid.",
                                expected=f"one of {', '.join(RESIZE_MODES)}")

    @classmethod
    def for_size(cls, size: int, **kw) -> "Preprocess":
        """The mmcls pipeline scaled to another crop size (resize = size·256/224); ``width`` for a non-square crop
        (the resize then scales the shorter side)."""
        width = kw.get("width")
        if size < 8 or (width is not None and width < 8):
            raise SedeployError(f"Input size {size}{f'×{width}' if width else ''} is too small.",
                                expected="a crop size ≥ 8 pixels, e.g. 224")
        return cls(size=size, resize_short=round(min(size, width or size) * 256 / 224), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """The preprocessing recorded in a model's metadata (``as_dict``); TypeError/SedeployError when unreadable."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the arrays it makes."""
        return self.size, self.width or self.size

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for logs and reports."""
        h, w = self.shape
        resize = (f"resize to height {h} keeping the aspect ratio, width ≤ {w}, zero-padded" if self.resize_mode == "pad"
                  else f"resize short side {self.resize_short}, centre crop {h}×{w}")
        return (f"{resize}, {self.channel_order.upper()}, mean {', '.join(f'{v:g}' for v in self.mean)}, std "
                f"{', '.join(f'{v:g}' for v in self.std)} (0–255 pixels)")


def recorded_preprocess(stored, hw: tuple[int, int], *, name: str = "the model") -> Preprocess:
    """The preprocessing a model records (its ``sedeploy.preprocess`` metadata: the ``as_dict`` dict or that dict's
    JSON text) when it is readable and makes images of the model's input size ``hw`` = (height, width), else
    mmcls's pipeline at that height and width (a warning says why when a record was there but is not used). The
    one rule for "which preprocessing does this model take": callers pass H and W as the input's layout has them."""
    h, w = int(hw[0]), int(hw[1])
    fallback = f"using the mmcls pipeline at {h}×{w} px"
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            pass
    if stored is not None:
        try:
            if not isinstance(stored, dict):
                raise TypeError(f"not a mapping: {type(stored).__name__}")
            pp = Preprocess.from_dict(stored)
        except (TypeError, SedeployError):
            log.warning("Ignoring unreadable preprocessing metadata %s of %s; %s.", stored, name, fallback)
        else:
            if pp.shape == (h, w):
                return pp
            log.warning("The preprocessing metadata of %s makes %d×%d images, its input is %d×%d; %s.", name,
                        *pp.shape, h, w, fallback)
    return Preprocess.for_size(h, width=None if h == w else w)


#: a std below this (on 0–255 pixels) multiplies pixel steps by more than 1000: no normalisation does that
MIN_STD = 1e-3


def check_normalisation(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Refuse ``--mean``/``--std`` that are not on the 0–255 pixel scale the pipeline normalises.

    Pipelines written "x/255, then (x − m)/s" (torchvision, PaddleOCR) state m and s on the 0–1 scale; on 0–255
    pixels the same arithmetic is (x − 255·m)/(255·s). A mean whose values are all in (0, 1], or a std whose values
    are all ≤ 1 (other than raw pixels, std 1), is such a value (ImageNet: 0.485/0.229): refused with the 0–255
    values it stands for. A std below :data:`MIN_STD` (e.g. 1e-30, which multiplies the pixels by 1e30) is refused
    as no normalisation at all."""
    m = tuple(mean) if mean else None
    s = tuple(std) if std else None
    example = ("e.g. ImageNet's 0.485,0.456,0.406 / 0.229,0.224,0.225 (on 0–1) are --mean 123.675,116.28,103.53 "
               "--std 58.395,57.12,57.375; x/127.5 − 1 is --mean 127.5,127.5,127.5 --std 127.5,127.5,127.5")
    if s is not None and min(s) < MIN_STD:
        raise SedeployError(f"--std {','.join(f'{v:g}' for v in s)} is not a normalisation: dividing 0–255 pixels by "
                            f"{min(s):g} multiplies them by {1 / min(s):.3g}.",
                            expected="a std on 0–255 pixels (typically 50–130; 1 feeds raw pixels)",
                            fix=f"pass the std the model was trained with, on 0–255 pixels ({example})")
    mean_01 = m is not None and 0 < max(m) <= 1
    std_01 = s is not None and max(s) <= 1 and s != (1.0,) * len(s)
    if not (mean_01 or std_01):
        return
    given = " ".join(f"--{k} {','.join(f'{v:g}' for v in val)}" for k, val in (("mean", m), ("std", s)) if val)
    scaled = {k: ",".join(f"{v * 255:g}" for v in val) for k, val in (("mean", m), ("std", s))
              if val and (k == "mean" and mean_01 or k == "std" and std_01)}
    why = (f"dividing by std {min(s):g} multiplies pixels by {1 / min(s):.3g}" if std_01
           else f"a mean of {max(m):g} subtracts almost nothing from 0–255 pixels")
    raise SedeployError(f"{given}: {'these look' if len(scaled) > 1 else 'this looks'} like the 0–1 scale (x/255), "
                        f"but sedeploy normalises 0–255 pixels ({why}).",
                        expected="mean and std on 0–255 pixels: a pipeline 'x/255, then (x − m)/s' is mean 255·m, "
                                 "std 255·s",
                        fix="pass " + " ".join(f"--{k} {v}" for k, v in scaled.items())
                            + ("" if scaled.get("mean") == "123.675,116.28,103.53" else f" ({example})"))


@dataclass
class ImageSet:
    """Files found in a folder: paths (sorted), their class-folder name (None for flat folders), skipped files."""

    root: Path
    paths: list[Path] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    not_files: list[tuple[Path, str]] = field(default_factory=list)  # image-named entries that are no files


def _not_a_file(path: Path) -> str | None:
    """Why an image-named directory entry cannot be read as a file (None: it is a regular file, or a link to one).

    FIFOs, sockets and devices are refused before anything opens them (opening a FIFO blocks until a writer
    comes); broken and looping symbolic links are named as such."""
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic-link loop"
        if os.path.islink(path):
            return f"a broken symbolic link (to '{os.readlink(path)}')"
        return f"unreadable ({err.strerror or err})"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO (named pipe), not a file"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    return "not a regular file (a socket or device)"


def find_images(folder: str | os.PathLike, *, what: str = "image folder") -> ImageSet:
    """List the images in a flat or class-subfolder folder, in a deterministic (sorted) order."""
    root = Path(folder)
    if not root.exists():
        raise SedeployError(f"The {what} '{root}' does not exist.",
                            fix="pass a folder of JPEG/PNG images (the shipped default is calib/)")
    if not root.is_dir():
        raise SedeployError(f"The {what} '{root}' is a file, not a folder.",
                            expected="a folder of images, flat or with one subfolder per class")
    found = ImageSet(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            ext = path.suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                why = _not_a_file(path)
                if why is not None:
                    found.not_files.append((path, why))
                    continue
                found.paths.append(path)
                found.classes.append(rel.parts[0] if rel.parts else None)
            elif ext not in QUIET_EXTENSIONS:
                found.skipped.append(path)
    if found.skipped:
        names = ", ".join(str(p.relative_to(root)) for p in found.skipped[:5])
        more = f" and {len(found.skipped) - 5} more" if len(found.skipped) > 5 else ""
        log.warning("Skipping %d non-image file(s) in %s: %s%s", len(found.skipped), root, names, more)
    if found.not_files:
        names = ", ".join(f"{p.relative_to(root)} ({why})" for p, why in found.not_files[:5])
        more = f" and {len(found.not_files) - 5} more" if len(found.not_files) > 5 else ""
        log.warning("Skipping %d image-named entr%s in %s that %s not readable image files: %s%s",
                    len(found.not_files), "y" if len(found.not_files) == 1 else "ies", root,
                    "is" if len(found.not_files) == 1 else "are", names, more)
    if not found.paths:
        raise SedeployError(f"The {what} '{root}' contains no images.",
                            expected=f"files with one of the extensions {', '.join(sorted(IMAGE_EXTENSIONS))}",
                            fix="point at a folder of photos, e.g. the shipped calib/")
    return found


def load_image(path: str | os.PathLike, pp: Preprocess = Preprocess()) -> np.ndarray:
    """One image → float32 array (3, H, W), normalised. Raises OSError/ValueError on undecodable files, and
    ValueError for an image over twice PIL's pixel limit (≈ 179 MP: a small file can decode to gigabytes) or one
    that resizing would blow up past :data:`MAX_RESIZED_FACTOR` × the crop (a 20000×1 strip); between the limit and
    twice it, PIL's own warning is not printed (the image loads, slowly)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _load_image(path, pp)
    except Image.DecompressionBombError as err:
        raise ValueError(f"too large to decode safely ({err})") from err


def _load_image(path, pp: Preprocess) -> np.ndarray:
    from PIL import Image, ImageOps

    ch, cw = pp.shape
    with Image.open(path) as im:
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: the photo as it is meant to be seen
            im = ImageOps.exif_transpose(im)
        w, h = im.size
        if pp.resize_mode == "pad":
            nh, nw = ch, max(1, min(cw, math.ceil(ch * w / h)))
        else:
            scale = max(pp.resize_short * ch / min(ch, cw) / h, pp.resize_short * cw / min(ch, cw) / w)
            nw, nh = max(cw, round(w * scale)), max(ch, round(h * scale))
        if nw * nh > MAX_RESIZED_FACTOR * ch * cw:
            raise ValueError(f"too large after resizing ({w}×{h} px would become {nw}×{nh}: an aspect ratio of "
                             f"{max(w, h) / min(w, h):.0f}:1)")
        im = _to_rgb(im)
        im = im.resize((nw, nh), Image.BILINEAR)
        if pp.resize_mode == "crop":
            left = max(0, int(round((nw - cw) / 2.0)))
            top = max(0, int(round((nh - ch) / 2.0)))
            im = im.crop((left, top, left + cw, top + ch))
        arr = np.asarray(im, dtype=np.float32)
    if pp.channel_order == "bgr":
        arr = arr[..., ::-1]
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    if pp.resize_mode == "pad":
        padded = np.zeros((ch, cw, 3), np.float32)
        padded[:, :arr.shape[1]] = arr
        arr = padded
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def layout_batch(x: np.ndarray, layout: str | None) -> np.ndarray:
    """An N×3×H×W batch laid out for an input of ``layout`` ("NCHW": as is; "NHWC": channels last, contiguous).
    The one place a batch is turned for an engine: bench, serving and the build's checks all call it."""
    if layout in (None, "NCHW"):
        return x
    if layout == "NHWC":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    raise SedeployError(f"Unknown input layout {layout!r}.", expected="NCHW or NHWC")


def _to_rgb(im):
    """PIL image → 8-bit RGB. 16-bit grayscale (PNG/TIFF mode ``I;16*``, or ``I`` holding values > 255) is scaled
    by 255/65535; PIL's own ``convert("RGB")`` clips such pixels at 255, which turns most photos white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":  # 32-bit float images: taken as 0–1 when they fit there, else as 0–255
        a = np.asarray(im, dtype=np.float64)
        if a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


#: unreadable images already named in a warning by this process (build-engine reads its --calib folder for the
#: fusion check, the FP16 check and calibration: each file is named once)
_WARNED: set[Path] = set()


def load_batch(paths: list[Path], pp: Preprocess = Preprocess(), *, progress: bool = False,
               what: str = "image folder") -> tuple[np.ndarray, list[Path]]:
    """Load and preprocess ``paths``; corrupt files are skipped with a warning naming them.

    Returns (N×3×S×S float32 array, the paths actually loaded). Raises if none could be loaded.
    """
    from tqdm import tqdm

    arrays, loaded, bad = [], [], []
    for path in tqdm(paths, desc="Loading images", unit="img", disable=not progress, leave=False):
        try:
            arrays.append(load_image(path, pp))
            loaded.append(path)
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for corrupt/unknown files
            bad.append((path, err))
    new = [(p, e) for p, e in bad if p.resolve() not in _WARNED]  # one run reads a folder more than once
    _WARNED.update(p.resolve() for p, _ in new)
    if new:
        names = ", ".join(f"{p.name} ({str(e) if str(e).startswith('too large') else type(e).__name__})"
                          for p, e in new[:5])
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        log.warning("Skipping %d unreadable image(s): %s%s", len(new), names, more)
    if not arrays:
        raise SedeployError(f"None of the {len(paths)} image file(s) in the {what} could be decoded.",
                            fix="check the files are valid JPEG/PNG images, or pass another folder")
    return np.stack(arrays), loaded


def load_folder(folder: str | os.PathLike, pp: Preprocess = Preprocess(), *, limit: int | None = None,
                progress: bool = False, what: str = "image folder") -> tuple[np.ndarray, list[Path]]:
    """:func:`find_images` + :func:`load_batch` (first ``limit`` files in sorted order)."""
    found = find_images(folder, what=what)
    paths = found.paths[:limit] if limit else found.paths
    return load_batch(paths, pp, progress=progress, what=f"{what} '{found.root}'")


def smooth_noise(n: int, size: int | tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random test input with natural-image statistics (low-frequency, unit variance), float32 N×3×H×W; ``size``
    is H = W or (H, W).

    White noise is far outside what a classifier sees; smooth noise keeps activations in their usual range.
    """
    import torch

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, max(2, h // 14), max(2, w // 14)), generator=gen)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return (x / x.std()).numpy().astype(np.float32)
