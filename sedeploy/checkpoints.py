"""Load (SE-)ResNet checkpoints in the layouts that circulate: detected, checked, loaded strictly.

| format         | source                                   | SE keys of block layer1.0, head             | network |
|----------------|------------------------------------------|---------------------------------------------|---------|
| mmcls          | mmcls/mmpretrain release (20200804 on)   | backbone.…se_layer.conv1.conv.*, head.fc    | pytorch |
| mmcls-20200708 | the first mmcls SE-ResNet release        | backbone.…se_layer.conv1.*, head.fc         | pytorch |
| timm           | timm seresnet* (plain resnet*: no SE)    | layer1.0.se.fc1.*, fc                       | pytorch |
| cadene         | Cadene se_resnet*, timm legacy_seresnet* | layer1.0.se_module.fc1.*, last_linear       | caffe   |

(Cadene's stem is ``layer0.conv1`` / ``layer0.bn1``; mmcls keys carry the ``backbone.`` prefix.)

"pytorch" is the mmcls network (stride on the 3×3 conv, stem max-pool padding 1). "caffe" is a *different*
network with the same tensors: stride on the first 1×1 conv and a padding-0, ceil-mode stem max-pool. Cadene
weights are therefore loaded into ``build_model(style="caffe", stem_pool_ceil=True)``; in the mmcls network they
would run without error and give wrong outputs. (Cadene's own model pools with a fixed 7×7 window, which equals our
global pool at 224×224 input only.)

Refused with a message: moskomule senet.pytorch (its SE uses bias-free Linear layers, ``se.fc.0.weight``) and
anything else. Checkpoints may be wrapped (``{'meta', 'state_dict'}``, ``{'model': …}``) and carry ``module.``
prefixes. Depth, SE, width and class count are read from the tensors; loading is strict (only BatchNorm's
``num_batches_tracked`` counters, unused at inference, may be absent).

One rename table maps our (mmcls) key names to each layout; loading builds the detected network, renames its keys
into the checkpoint's layout and compares, so errors name keys as they appear in the user's file.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import re
import struct
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sedeploy.errors import SedeployError
from sedeploy.fsutil import atomic_path, cache_dir, ensure_writable_dir
from sedeploy.model import ARCH, ImageClassifier, ModelSpec, build_model
from sedeploy.onnxcore import sha256_file

log = logging.getLogger("sedeploy")

FORMATS = ("mmcls", "mmcls-20200708", "timm", "cadene")
SUPPORTED = ("mmcls/mmpretrain release (backbone.*, head.fc.*; either SE key schema), timm seresnet*/resnet* "
             "(se.fc1, fc), Cadene se_resnet* / timm legacy_seresnet* (layer0.*, se_module.fc1, last_linear)")

_SE = r"\.se_layer\.conv(\d)\.conv\."
#: our (mmcls) key → the format's key, applied in order
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "mmcls": [],
    "mmcls-20200708": [(_SE, r".se_layer.conv\1.")],
    "timm": [(r"^backbone\.", ""), (_SE, r".se.fc\1."), (r"^head\.fc\.", "fc.")],
    "cadene": [(r"^backbone\.(conv1|bn1)\.", r"layer0.\1."), (r"^backbone\.", ""), (_SE, r".se_module.fc\1."),
               (r"^head\.fc\.", "last_linear.")],
}
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of pre-1.6 torch.save files
#: what torch.load raises on damaged files (found by loading truncated and byte-flipped checkpoints of both
#: serialization formats), plus ImportError/AttributeError for pickles whose classes are not importable
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError,
                AssertionError, struct.error, OSError, ImportError, AttributeError)
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z]+$")  # torch.hub convention: name-<sha256 prefix>.pth


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: ImageClassifier  # eval mode, every tensor from the checkpoint
    spec: ModelSpec
    format: str  # one of FORMATS
    source: str  # the path or URL the user gave
    sha256: str  # of the file
    path: Path  # the local file (the cached download for a URL)


def weights_label(loaded: LoadedCheckpoint | None, seed: int = 0) -> str:
    """What the weights are, in every command's output: ``random (seed 0)``, ``mmcls checkpoint x.pth (sha256 …)``."""
    if loaded is None:
        return f"random (seed {seed})"
    return f"{loaded.format} checkpoint {loaded.path.name} (sha256 {loaded.sha256[:12]})"


def default_cache_dir() -> Path:
    """``$SEDEPLOY_CACHE/checkpoints`` when SEDEPLOY_CACHE is set, else ``~/.cache/sedeploy/checkpoints``."""
    return cache_dir("checkpoints")


def load_checkpoint(source: str | os.PathLike, *, depth: int | None = None, num_classes: int | None = None,
                    cache_dir: str | os.PathLike | None = None, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint file or URL into the network it describes, or raise a :class:`SedeployError` saying why not.

    ``depth`` / ``num_classes``, when given, must agree with the checkpoint. ``allow_pickle=True`` lets torch
    unpickle arbitrary Python objects (code execution!): only for files from a source you trust.
    """
    src = str(source)
    is_url = src.startswith(("http://", "https://"))
    path = _download(src, Path(cache_dir) if cache_dir else default_cache_dir()) if is_url else Path(src).expanduser()
    if not path.exists():
        raise SedeployError(f"The checkpoint '{src}' does not exist.",
                            fix="pass a .pth file (or an http(s) URL to one), e.g. --checkpoint se-resnet50.pth")
    if path.is_dir():
        raise SedeployError(f"The checkpoint '{src}' is a folder.", fix="pass the .pth file itself")
    sha = _sha256(path, src)
    if is_url:
        _check_hash_prefix(path, sha)
    sd = _state_dict(_torch_load(path, src, allow_pickle), src)
    fmt = _detect_format(sd, src)
    spec = _detect_spec(sd, fmt, src)
    if depth is not None and depth != spec.depth:
        raise SedeployError(f"The checkpoint '{src}' is {_title(spec)}, you asked for --depth {depth}.",
                            fix=f"pass --depth {spec.depth} (or leave --depth out with a checkpoint)")
    if num_classes is not None and num_classes != spec.num_classes:
        raise SedeployError(f"The checkpoint '{src}' has a {spec.num_classes}-class head, you asked for "
                            f"--num-classes {num_classes}.",
                            fix=f"pass --num-classes {spec.num_classes} or leave it out")
    model = _load_strict(sd, spec, fmt, src)
    log.info("loaded %s checkpoint %s as %s (%d tensors)", fmt, src, spec.name, len(sd))
    return LoadedCheckpoint(model, spec, fmt, src, sha, path)


def to_format(state: ImageClassifier | Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our model's tensors under another format's key names (to re-save, or to test the loader).

    Pass the model itself to have the block style checked: ``cadene`` is only for caffe-style models
    (``style="caffe", stem_pool_ceil=True``) and the other formats only for the mmcls (pytorch-style) network,
    because a file in the wrong layout would load into the wrong network and silently give wrong outputs.
    A bare state dict is renamed without that check.
    """
    if fmt not in FORMATS:
        raise SedeployError(f"Unknown checkpoint format {fmt!r}.", expected=", ".join(FORMATS))
    if isinstance(state, ImageClassifier):
        style = (state.spec.style, state.spec.stem_pool_ceil)
        needed = ("caffe", True) if fmt == "cadene" else ("pytorch", False)
        if style != needed:
            raise SedeployError(
                f"A {state.spec.name} model (style={style[0]!r}, stem_pool_ceil={style[1]}) cannot be saved in the "
                f"{fmt} layout: files in that layout load into the style={needed[0]!r}, stem_pool_ceil={needed[1]} "
                "network.", expected="cadene for caffe-style models, mmcls / mmcls-20200708 / timm otherwise")
        state = state.state_dict()
    return {_rename(k, fmt): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------------------------
# Reading the file


def _download(url: str, cache_dir: Path) -> Path:
    """The cached copy of ``url``, downloaded (atomically, hash-checked when the name carries one) if absent."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise SedeployError(f"The URL '{url}' names no file.", expected="a URL ending in a file name, e.g. …/x.pth")
    dest = cache_dir / name
    if dest.exists():
        log.info("using cached %s", dest)
        return dest
    ensure_writable_dir(cache_dir, "checkpoint cache folder",
                        fix="set SEDEPLOY_CACHE to a writable folder, or download the file and pass its path")
    log.info("downloading %s → %s", url, dest)
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
            _check_hash_prefix(dest, h.hexdigest(), downloaded_from=url)
    except urllib.error.HTTPError as err:
        raise SedeployError(f"Could not download '{url}': the server answered HTTP {err.code} {err.reason}.",
                            fix="check the URL, or download the file by hand and pass its local path") from err
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise SedeployError(f"Could not download '{url}' ({reason}): this machine is offline or the URL is "
                            "unreachable.",
                            fix=f"download the file on a machine with internet access and pass its local path "
                                f"(--checkpoint ./{name}), or copy it to {dest} so this URL is served from the "
                                "cache") from err
    except OSError as err:
        raise SedeployError(f"Could not write '{dest}' while downloading '{url}' ({err}).",
                            fix="free disk space or set SEDEPLOY_CACHE to a writable folder") from err
    return dest


def _check_hash_prefix(path: Path, sha: str, downloaded_from: str | None = None) -> None:
    m = _HASH_IN_NAME.search(path.name)
    if m and not sha.startswith(m[1]):
        where = f"The file downloaded from '{downloaded_from}'" if downloaded_from else f"The cached file '{path}'"
        raise SedeployError(f"{where} has sha256 {sha[:16]}…, but its name promises a hash starting {m[1]}: the "
                            "download is corrupt or the server sent a different file.",
                            fix="retry; if it persists, download the file by hand and pass its local path"
                                + ("" if downloaded_from else f" (delete {path} first)"))


def _sha256(path: Path, src: str) -> str:
    return sha256_file(path, what=f"checkpoint (given as '{src}')")


def _torch_load(path: Path, src: str, allow_pickle: bool):
    """``torch.load`` (weights only unless ``allow_pickle``) with its failures explained by what the file is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except _LOAD_ERRORS as err:
        text = str(err).strip()
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        is_zip = head.startswith(_ZIP_MAGIC)
        refit = "re-download or re-save it (torch.save(model.state_dict(), path))"
        if not head:
            raise SedeployError(f"The checkpoint '{src}' is empty (0 bytes).", fix=refit) from err
        if not is_zip and head != _LEGACY_MAGIC:
            raise SedeployError(f"'{src}' is not a PyTorch checkpoint (it starts with {head[:8]!r}).",
                                expected="a file written by torch.save (.pth/.pt)", fix=refit) from err
        if is_zip and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if not any(n.endswith("/data.pkl") for n in z.namelist()):
                    raise SedeployError(f"'{src}' is a zip archive but not a PyTorch checkpoint (no data.pkl).",
                                        expected="a file written by torch.save (.pth/.pt)", fix=refit) from err
        # torch words the refusal differently across versions: "Unsupported global: GLOBAL x.y" (a type it does
        # not allow) and "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" (a callable
        # such as os.system: a malicious file); both come with "Weights only load failed".
        unsupported = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
        if isinstance(err, pickle.UnpicklingError) and (unsupported or "Weights only load failed" in text):
            what = unsupported[1] if unsupported else "objects torch's weights-only loader refuses"
            raise SedeployError(
                f"The checkpoint '{src}' stores pickled Python objects besides tensors ({what}), which "
                "sedeploy does not unpickle by default because unpickling can run arbitrary code.",
                fix="re-save only the tensors (torch.save(ckpt['state_dict'], path)), or, for a file from a source "
                    "you trust, call load_checkpoint(..., allow_pickle=True)") from err
        if isinstance(err, (ImportError, AttributeError)):
            raise SedeployError(f"The checkpoint '{src}' pickles objects whose code is not importable here ({text}).",
                                fix="re-save only the tensors (torch.save(ckpt['state_dict'], path))") from err
        first = text.splitlines()[0] if text else type(err).__name__
        raise SedeployError(f"The checkpoint '{src}' is truncated or corrupt ({type(err).__name__}: {first}).",
                            fix="re-download or re-copy the file and compare its size / sha256") from err


def _state_dict(obj, src: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': …}`` / ``{'model': …}`` and ``module.`` prefixes down to name → tensor."""
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (allow_pickle only)
        obj = obj.state_dict()
    for _ in range(2):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj, Mapping)
                      and isinstance(obj.get(k), Mapping)), None)
        obj = obj if inner is None else inner
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise SedeployError(f"The checkpoint '{src}' holds {what}, not a state dict of tensors.", expected=SUPPORTED)
    bad = next(((k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad:
        raise SedeployError(f"The checkpoint '{src}' is not a state dict: entry {bad[0]!r} is not a tensor "
                            f"({type(bad[1]).__name__}).", expected=SUPPORTED)
    if all(k.startswith("module.") for k in obj):
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ------------------------------------------------------------------------------------------------------------------
# Recognising and loading


def _rename(key: str, fmt: str) -> str:
    for pattern, replacement in _RENAMES[fmt]:
        key = re.sub(pattern, replacement, key)
    return key


def _detect_format(sd: Mapping[str, torch.Tensor], src: str) -> str:
    if any(".se.fc.0.weight" in k for k in sd):
        raise SedeployError(f"The checkpoint '{src}' is in the senet.pytorch (moskomule) layout: its SE block uses "
                            "bias-free Linear layers (se.fc.0.weight), a different network from mmcls SE-ResNet "
                            "(1×1 convs with bias).", expected=SUPPORTED,
                            fix="use an mmcls, timm or Cadene SE-ResNet checkpoint")
    if "backbone.conv1.weight" in sd:
        return "mmcls-20200708" if any(k.endswith(".se_layer.conv1.weight") for k in sd) else "mmcls"
    if "layer0.conv1.weight" in sd:
        return "cadene"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "timm"
    keys = list(sd)
    hint = (" It has mmcls 'backbone.' keys but no ResNet stem (backbone.conv1): another architecture."
            if any(k.startswith("backbone.") for k in keys) else "")
    raise SedeployError(f"The checkpoint '{src}' ({len(keys)} tensors: {', '.join(keys[:4])}, …) is not an "
                        f"(SE-)ResNet in a layout sedeploy reads.{hint}", expected=SUPPORTED,
                        fix="pass an SE-ResNet / ResNet checkpoint, e.g. the mmcls SE-ResNet-50 release")


def _title(spec: ModelSpec) -> str:
    return f"{'SE-ResNet' if spec.se else 'ResNet'}-{spec.depth}"


def _detect_spec(sd: Mapping[str, torch.Tensor], fmt: str, src: str) -> ModelSpec:
    """Depth from blocks per stage and block type, SE from the SE keys, width from the stem, classes from the head."""
    stages = [0, 0, 0, 0]
    for k in sd:
        m = re.match(r"(?:backbone\.)?layer([1-4])\.(\d+)\.", k)
        if m:
            stages[int(m[1]) - 1] = max(stages[int(m[1]) - 1], int(m[2]) + 1)
    kind = "bottleneck" if _rename("backbone.layer1.0.conv3.weight", fmt) in sd else "basic"
    depth = next((d for d, arch in ARCH.items() if arch == (kind, tuple(stages))), None)
    if depth is None:
        known = "; ".join(f"{d}: {k} {s}" for d, (k, s) in ARCH.items())
        raise SedeployError(f"The checkpoint '{src}' has {kind} blocks {tuple(stages)} per stage: no supported depth.",
                            expected=f"blocks per stage of a supported depth ({known})")
    head = sd.get(_rename("head.fc.weight", fmt))
    if head is None or head.ndim != 2:
        raise SedeployError(f"The checkpoint '{src}' has no classifier head ({_rename('head.fc.weight', fmt)}): it "
                            "is a backbone-only checkpoint.", fix="use a checkpoint of the full classifier")
    se = _rename("backbone.layer1.0.se_layer.conv1.conv.weight", fmt) in sd
    width = sd[_rename("backbone.conv1.weight", fmt)].shape[0]
    caffe = fmt == "cadene"
    return ModelSpec(depth, se, int(head.shape[0]), int(width), "caffe" if caffe else "pytorch", caffe)


def _load_strict(sd: Mapping[str, torch.Tensor], spec: ModelSpec, fmt: str, src: str) -> ImageClassifier:
    model = build_model(spec.depth, se=spec.se, num_classes=spec.num_classes, base_channels=spec.base_channels,
                        style=spec.style, stem_pool_ceil=spec.stem_pool_ceil, seed=None)
    ours = model.state_dict()
    names = {_rename(k, fmt): k for k in ours}  # checkpoint name → our name
    missing = [t for t, k in names.items() if t not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [t for t in sd if t not in names]
    wrong = [f"{t} {tuple(sd[t].shape)} vs {tuple(ours[k].shape)}" for t, k in names.items()
             if t in sd and sd[t].shape != ours[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what}: {', '.join(v[:4])}{', …' if len(v) > 4 else ''}"
                 for what, v in (("missing", missing), ("unexpected", unexpected),
                                 ("with the wrong shape (checkpoint vs model)", wrong)) if v]
        raise SedeployError(f"The checkpoint '{src}' ({fmt} format, read as {spec.name}) does not match that network: "
                            + "; ".join(parts) + ".", expected=f"exactly the {len(names)} tensors of {spec.name}",
                            fix="check that the file is a complete SE-ResNet/ResNet checkpoint and not a variant "
                                "(ResNeXt, wide, deep-stem)")
    model.load_state_dict({k: sd[t] if t in sd else ours[k] for t, k in names.items()})
    return model.eval()
