"""A tiny *trained* SE-ResNet for tests that need meaningful predictions (INT8/FP16 agreement, accuracy drop).

Random weights make agreement tests weak: logits of an untrained net sit close together, so any perturbation
flips the top-1 and nothing can be concluded. This module trains ``build_model(18, base_channels=16,
num_classes=10)`` for a few seconds on a deterministic synthetic 10-class image set (oriented gratings, shapes,
checkerboards on random colours with noise) to ≥ 90 % held-out accuracy, exports it to ONNX and caches
everything, so the training cost is paid once per cache directory.

Images are generated at the preprocessing's resize size (``Preprocess.for_size(32).resize_short`` = 37 px), so the
shared pipeline (:func:`sedeploy.preprocess.load_image`) only centre-crops them to 32×32: the PNG files on disk,
the arrays the network trained on and what calibration reads are the same pixels.

Usage (from any test)::

    from tiny_trained import tiny_trained, tiny_trained_onnx
    onnx_path, images, labels = tiny_trained_onnx(cache_dir)          # held-out float32 N×3×32×32, int64 N
    art = tiny_trained(cache_dir, opset=17)  # .calib_dir (64 PNGs), .heldout_dir (<class>/*.png), .accuracy …

Cache: ``<cache_dir>/tiny-se18-v1/``; pass ``tmp_path_factory.getbasetemp()`` (per session) or a persistent dir
such as ``$SEDEPLOY_CACHE``. A file lock makes concurrent pytest-xdist workers train only once.
"""
from __future__ import annotations

#: The model is trained at test time, so its weights differ from machine to machine (float summation order, the
#: ISA PyTorch's kernels use, numpy's version), and so do the INT8 / FP16 kernels that run it (VNNI/AMX or AVX2):
#: no test asserts an exact outcome of it (a count of flips, which layers a search needs, a 100 % agreement).
#: Tests assert bounds that hold with a margin on any x86-64 CPU, and relations that hold by construction.
#:
#: The one INT8 top-1 agreement bound on this model (both flavours, both SE policies, every test that checks it).
#: Measured on 500 held-out images: 98.6–99.2 % across flavours and SE policies with the model trained on an Intel
#: Xeon (AMX); 97.6–99.6 % with the model trained on an AMD EPYC (AVX2; the TensorRT form, symmetric int8 on
#: post-ReLU tensors, the lowest: 97.6 / 98.2 % even with ONNX Runtime's graph optimizations off, so it is the
#: model, not the kernels). 95 % keeps a margin of 2.6 points (13 images) under the lowest figure seen and still
#: fails a real fault by far: ONNX Runtime's WeightBiasQuantization rewrite of the FP16 Q/DQ graph (the bug
#: sedeploy.backends.ort disables) gives 75–76 % on the same model.
INT8_MIN_AGREEMENT = 0.95
#: What tests may assume of the FP32 model's held-out top-1: training refuses a model below MIN_ACCURACY (90 %,
#: measured in PyTorch); 85 % leaves room for another runtime's float differences and for INT8 on top of it.
MIN_TEST_ACCURACY = 0.85
#: FP16 against FP32 on this model: a flip is allowed only on a near-tie (an image whose FP32 top-1 margin is within
#: twice its max |Δlogit|: :func:`assert_flips_only_near_ties`), and at most this fraction of images may flip. Zero
#: flips on 500 images (the 99.9 % goal) is what one CPU measured, not what every CPU's FP16/FP32 kernels give.
FP16_MAX_FLIPS = 0.01


def assert_flips_only_near_ties(ref, got, *, max_flips: float = FP16_MAX_FLIPS, what: str = "FP16") -> None:
    """``got`` (N×C logits) classifies like ``ref``: at most ``max_flips`` of the images change their top-1, and
    every one that does was a near-tie in ``ref``: its top-1 margin is within twice that image's max |Δlogit| (a
    flip on a confident image means the conversion is wrong, on any CPU)."""
    import numpy as np

    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    flips = np.flatnonzero(ref.argmax(1) != got.argmax(1))
    assert len(flips) <= max_flips * len(ref), \
        f"{what} top-1 agreement {1 - len(flips) / len(ref):.2%} ({len(flips)} of {len(ref)} flipped)"
    top2 = np.sort(ref, 1)[:, -2:]
    for i in flips:
        margin = top2[i, 1] - top2[i, 0]
        drift = np.abs(got[i] - ref[i]).max()
        assert margin <= 2 * drift, f"{what}: image {i} flipped with margin {margin:.3g} > 2 × drift {drift:.3g}"

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sedeploy.fsutil import atomic_path, atomic_write_text
from sedeploy.preprocess import Preprocess, load_folder

VERSION = "tiny-se18-v1"
SIZE = 32
PREPROCESS = Preprocess.for_size(SIZE)
RAW = PREPROCESS.resize_short  # generated image side: the resize step is then the identity
NUM_CLASSES = 10
CLASS_NAMES = ("grating_h", "grating_v", "grating_d45", "grating_d135", "disc", "square", "ring", "cross",
               "checker", "dots")
N_TRAIN, N_CALIB, N_HELDOUT = 4000, 64, 500
MIN_ACCURACY = 0.90
TRAIN_BUDGET_S = 900.0  # a guard only: 620 steps take ~50-75 s on 2 cores


# ------------------------------------------------------------------------------------------------- data


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours at least 90 levels apart (so every class is visible)."""
    while True:
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.abs(bg - fg).max() > 90:
            return bg, fg


def draw(label: int, rng: np.random.Generator, n: int = RAW) -> np.ndarray:
    """One n×n×3 uint8 image of class ``label``."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = rng.uniform(0.38, 0.62, 2) * n
    bg, fg = _colours(rng)
    if label <= 3:  # gratings at 0°, 90°, 45°, 135°
        angle = (0.0, 90.0, 45.0, 135.0)[label] + rng.uniform(-8, 8)
        period = rng.uniform(4.5, 8.0)
        t = np.deg2rad(angle)
        proj = xx * np.sin(t) + yy * np.cos(t)
        mask = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi))
    elif label == 4:  # disc
        r = rng.uniform(0.2, 0.33) * n
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.float32)
    elif label == 5:  # square (axis-aligned)
        h = rng.uniform(0.18, 0.3) * n
        mask = ((np.abs(xx - cx) < h) & (np.abs(yy - cy) < h)).astype(np.float32)
    elif label == 6:  # ring
        r = rng.uniform(0.22, 0.34) * n
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        mask = (np.abs(d - r) < rng.uniform(1.5, 3.0)).astype(np.float32)
    elif label == 7:  # plus-shaped cross
        h, w = rng.uniform(0.25, 0.38) * n, rng.uniform(1.5, 3.0)
        mask = (((np.abs(xx - cx) < w) & (np.abs(yy - cy) < h)) |
                ((np.abs(yy - cy) < w) & (np.abs(xx - cx) < h))).astype(np.float32)
    elif label == 8:  # checkerboard
        cell = rng.uniform(3.5, 6.0)
        ox, oy = rng.uniform(0, cell, 2)
        mask = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float32)
    else:  # scattered dots
        mask = np.zeros((n, n), np.float32)
        for _ in range(int(rng.integers(7, 13))):
            px, py = rng.uniform(2, n - 2, 2)
            mask[((xx - px) ** 2 + (yy - py) ** 2) < rng.uniform(1.5, 2.6) ** 2] = 1.0
    img = bg[None, None, :] * (1 - mask[..., None]) + fg[None, None, :] * mask[..., None]
    img += rng.normal(0, rng.uniform(6, 18), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n balanced images (N×RAW×RAW×3 uint8) and labels (int64), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    return np.stack([draw(int(y), rng) for y in labels]), labels


def to_input(images_uint8: np.ndarray, pp: Preprocess = PREPROCESS) -> np.ndarray:
    """What :func:`sedeploy.preprocess.load_image` makes of these pixels (centre crop + normalise), vectorised."""
    n = images_uint8.shape[1]
    off = int(round((n - pp.size) / 2.0))
    crop = images_uint8[:, off:off + pp.size, off:off + pp.size].astype(np.float32)
    crop = (crop - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(crop.transpose(0, 3, 1, 2))


# ------------------------------------------------------------------------------------------------- model


def _train(seed: int = 0):
    import torch

    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine two OpenMP threads spin against other processes and a step takes
    # 50× longer (measured 8 s vs 0.12 s per batch of 64).
    torch.set_num_threads(1)
    try:
        return _train_loop(seed)
    finally:
        torch.set_num_threads(threads)


def _train_loop(seed: int):
    import torch
    from torch import nn

    from sedeploy.model import build_model

    torch.manual_seed(seed)
    imgs, labels = make_images(N_TRAIN, seed=1000 + seed)
    x_all, y_all = torch.from_numpy(to_input(imgs)), torch.from_numpy(labels)
    model = build_model(18, base_channels=16, num_classes=NUM_CLASSES, seed=seed).train()
    epochs, bs = 10, 64
    steps = epochs * (N_TRAIN // bs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    for _ in range(epochs):
        order = torch.randperm(N_TRAIN, generator=gen)
        for i in range(0, N_TRAIN - bs + 1, bs):
            idx = order[i:i + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
            sched.step()
            step += 1
            if time.perf_counter() - t0 > TRAIN_BUDGET_S:
                break
        if time.perf_counter() - t0 > TRAIN_BUDGET_S:
            break
    return model.eval(), time.perf_counter() - t0, step, steps


@dataclass
class TinyArtifacts:
    onnx_path: Path
    weights_path: Path
    calib_dir: Path  # N_CALIB flat PNGs (for calibrate())
    heldout_dir: Path  # <class name>/*.png, N_HELDOUT images
    images: np.ndarray  # held-out, preprocessed float32 N×3×32×32 (read back through load_folder)
    labels: np.ndarray  # int64 N
    accuracy: float  # PyTorch held-out top-1 at training time
    train_seconds: float
    preprocess: Preprocess = PREPROCESS


class TinyOnnx(NamedTuple):
    onnx_path: Path
    images: np.ndarray
    labels: np.ndarray


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_pngs(folder: Path, images: np.ndarray, names: list[str]) -> None:
    from PIL import Image

    for img, name in zip(images, names):
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")


def _build(root: Path) -> None:
    import torch

    model, seconds, done, planned = _train()
    held, held_y = make_images(N_HELDOUT, seed=7)
    with torch.no_grad():
        pred = model(torch.from_numpy(to_input(held))).argmax(1).numpy()
    acc = float((pred == held_y).mean())
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"tiny SE-ResNet reached only {acc:.1%} held-out accuracy after {seconds:.0f}s "
                           f"({done}/{planned} steps); tests need ≥ {MIN_ACCURACY:.0%}")
    calib, _ = make_images(N_CALIB, seed=3)
    write_pngs(root / "calib", calib, [f"calib_{i:03d}.png" for i in range(N_CALIB)])
    write_pngs(root / "heldout", held,
                [f"{y}_{CLASS_NAMES[y]}/img_{i:04d}.png" for i, y in enumerate(held_y)])
    with atomic_path(root / "weights.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    atomic_write_text(root / "meta.json", json.dumps(
        {"version": VERSION, "accuracy": acc, "train_seconds": round(seconds, 2), "steps": done,
         "planned_steps": planned}, indent=1))


def _export(root: Path, opset: int) -> Path:
    import torch

    from sedeploy.export import export_onnx
    from sedeploy.model import build_model

    path = root / f"tiny_se18_op{opset}.onnx"
    if not path.exists():
        model = build_model(18, base_channels=16, num_classes=NUM_CLASSES)
        model.load_state_dict(torch.load(root / "weights.pt", weights_only=True))
        export_onnx(model.eval(), path, opset=opset, input_size=SIZE,
                    metadata={"sedeploy.input_size": SIZE, "sedeploy.num_classes": NUM_CLASSES,
                              "sedeploy.preprocess": PREPROCESS.as_dict()})
    return path


def tiny_trained(cache_dir: str | os.PathLike, *, opset: int = 18) -> TinyArtifacts:
    """Train (once per cache dir) and export the tiny SE-ResNet; opset 18 = ReduceMean squeeze, 17 = GAP."""
    root = Path(cache_dir) / VERSION
    with locked(Path(cache_dir) / f".{VERSION}.lock"):
        if not (root / "meta.json").exists():
            _build(root)
        onnx_path = _export(root, opset)
    meta = json.loads((root / "meta.json").read_text())
    images, paths = load_folder(root / "heldout", PREPROCESS)
    labels = np.array([int(p.parent.name.split("_")[0]) for p in paths], np.int64)
    return TinyArtifacts(onnx_path=onnx_path, weights_path=root / "weights.pt", calib_dir=root / "calib",
                         heldout_dir=root / "heldout", images=images, labels=labels, accuracy=meta["accuracy"],
                         train_seconds=meta["train_seconds"])


def tiny_trained_onnx(cache_dir: str | os.PathLike, *, opset: int = 18) -> TinyOnnx:
    """(onnx_path, held-out images float32 N×3×32×32 preprocessed, labels int64 N)."""
    art = tiny_trained(cache_dir, opset=opset)
    return TinyOnnx(art.onnx_path, art.images, art.labels)
