"""A third-party-style test classifier: what another framework's converter hands a sedeploy user.

Not sedeploy's SE-ResNet: a small MobileNetV3-like network written the way TF/Keras-to-ONNX and older PyTorch
code write it, exported through the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) at a
**fixed batch of 1**, so the decomposed forms appear in the graph exactly as such converters emit them:

- input 48×48 (not 224), 1001 outputs with a background class at index 0, a ``Softmax`` as the graph output;
- ReLU6 as ``Clip(0, 6)`` (min/max as inputs), hard-swish as ``x * Div(Clip(Add(x, 3), 0, 6), 6)``;
- three SE blocks, each spelled differently:
  1. squeeze ``AveragePool`` with the kernel covering the whole 24×24 map, FCs as 1×1 ``Conv``, ``Relu``,
     gate ``Add(3) → Clip(0, 6) → Div(6)``;
  2. squeeze ``ReduceMean`` (keepdims 0), FCs as ``Gemm`` (``nn.Linear``), ReLU6 ``Clip`` between them, gate
     ``Add(3) → Clip(0, 6) → Mul(0.1666…)``, ``Reshape`` back to the literal shape [1, C, 1, 1] (a
     batch-dependent constant, as converters write it);
  3. squeeze ``AveragePool`` over the 6×6 map + ``Flatten``, FCs as ``MatMul + Add``, ReLU6, gate
     ``HardSigmoid``, ``Unsqueeze`` back.

It is trained for a few seconds on the synthetic 10-class images of :mod:`tiny_trained` (classes 1–10; class 0,
background, and classes 11–1000 never occur), so its predictions are meaningful and agreement tests cannot be
fooled by near-equal random logits. Cached per cache directory like :mod:`tiny_trained`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sedeploy.fsutil import atomic_path, atomic_write_text
from sedeploy.preprocess import Preprocess, load_folder
from tiny_trained import CLASS_NAMES, NUM_CLASSES, draw, locked, write_pngs

VERSION = "foreign-mnv3-v2"
SIZE = 48
#: a TF-style normalisation (x/127.5 − 1), not ImageNet's: the CLI must be given --mean/--std for it
PREPROCESS = Preprocess.for_size(SIZE, mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5))
RAW = PREPROCESS.resize_short  # images are drawn at the resize size, so loading only centre-crops them
CLASSES = 1001
LABEL_OFFSET = 1  # synthetic class k is output k + 1 (index 0 = background)
N_TRAIN, N_CALIB, N_HELDOUT = 3000, 64, 300
MIN_ACCURACY = 0.85
TRAIN_BUDGET_S = 600.0  # a guard only: ~30-60 s on 2 cores


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n balanced RAW×RAW×3 uint8 images and their synthetic class (0–9, before the label offset)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    return np.stack([draw(int(y), rng, RAW) for y in labels]), labels


def to_input(images_uint8: np.ndarray) -> np.ndarray:
    n, off = images_uint8.shape[1], int(round((images_uint8.shape[1] - SIZE) / 2.0))
    crop = images_uint8[:, off:off + SIZE, off:off + SIZE].astype(np.float32)
    crop = (crop - np.asarray(PREPROCESS.mean, np.float32)) / np.asarray(PREPROCESS.std, np.float32)
    return np.ascontiguousarray(crop.transpose(0, 3, 1, 2))


def build_network(seed: int = 0):
    """The PyTorch module (random init, seeded)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(seed)

    def hsig_div(x):  # Add → Clip → Div
        return F.relu6(x + 3.0) / 6.0

    def hsig_mul(x):  # Add → Clip → Mul(1/6)
        return F.relu6(x + 3.0) * (1.0 / 6.0)

    def hswish(x):
        return x * hsig_div(x)

    def cbn(cin, cout, k=1, s=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))

    class SEConvPool(nn.Module):  # AveragePool(whole map) → Conv → Relu → Conv → Add/Clip/Div
        def __init__(self, c, hw):
            super().__init__()
            self.pool = nn.AvgPool2d(hw)
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * hsig_div(self.fc2(F.relu(self.fc1(self.pool(x)))))

    class SELinear(nn.Module):  # ReduceMean(keepdims 0) → Gemm → Clip → Gemm → Add/Clip/Mul → Reshape
        def __init__(self, c):
            super().__init__()
            self.c = c
            self.literal_batch = False  # set for the export only
            self.fc1, self.fc2 = nn.Linear(c, c // 4), nn.Linear(c // 4, c)

        def forward(self, x):
            s = x.mean((2, 3))
            g = hsig_mul(self.fc2(F.relu6(self.fc1(s))))
            # a converter writes the literal batch: Reshape to [1, C, 1, 1] (a batch-dependent constant)
            return x * g.reshape(1 if self.literal_batch else -1, self.c, 1, 1)

    class SEMatMul(nn.Module):  # AveragePool + Flatten → MatMul+Add → Clip → MatMul+Add → HardSigmoid → Unsqueeze
        def __init__(self, c, hw):
            super().__init__()
            self.hw = hw
            self.w1, self.b1 = nn.Parameter(torch.randn(c, c // 4) / c ** 0.5), nn.Parameter(torch.zeros(c // 4))
            self.w2 = nn.Parameter(torch.randn(c // 4, c) / (c // 4) ** 0.5)
            self.b2 = nn.Parameter(torch.zeros(c))

        def forward(self, x):
            s = torch.flatten(F.avg_pool2d(x, self.hw), 1)
            z = torch.matmul(F.relu6(torch.matmul(s, self.w1) + self.b1), self.w2) + self.b2
            return x * F.hardsigmoid(z).unsqueeze(-1).unsqueeze(-1)

    class Block(nn.Module):
        def __init__(self, cin, exp, cout, stride, se):
            super().__init__()
            self.expand = cbn(cin, exp) if exp != cin else None
            self.dw = cbn(exp, exp, 3, stride, groups=exp)
            self.se = se
            self.project = cbn(exp, cout)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = hswish(self.expand(x)) if self.expand is not None else x
            y = self.se(F.relu6(self.dw(y)))
            y = self.project(y)
            return x + y if self.residual else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbn(3, 16, 3, 2)  # 48 → 24
            self.b1 = Block(16, 16, 16, 1, SEConvPool(16, 24))
            self.b2 = Block(16, 48, 24, 2, SELinear(48))  # 24 → 12
            self.b3 = Block(24, 72, 24, 1, nn.Identity())
            self.b4 = Block(24, 96, 40, 2, SEMatMul(96, 6))  # 12 → 6
            self.head = cbn(40, 128)
            self.classifier = nn.Linear(128, CLASSES)

        def forward(self, x):
            x = hswish(self.stem(x))
            x = self.b4(self.b3(self.b2(self.b1(x))))
            x = hswish(self.head(x))
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return torch.softmax(self.classifier(x), dim=1)

    return Net()


def _train(seed: int = 0):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tiny_trained._train: one thread is far faster on a shared 2-core machine
    try:
        torch.manual_seed(seed)
        imgs, labels = make_images(N_TRAIN, seed=2000 + seed)
        x_all, y_all = torch.from_numpy(to_input(imgs)), torch.from_numpy(labels + LABEL_OFFSET)
        model = build_network(seed).train()
        epochs, bs = 8, 64
        steps = epochs * (N_TRAIN // bs)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(N_TRAIN, generator=gen)
            for i in range(0, N_TRAIN - bs + 1, bs):
                idx = order[i:i + bs]
                opt.zero_grad(set_to_none=True)
                # the network ends in Softmax (as exported); train on its log
                loss = torch.nn.functional.nll_loss(torch.log(model(x_all[idx]) + 1e-9), y_all[idx])
                loss.backward()
                opt.step()
                sched.step()
            if time.perf_counter() - t0 > TRAIN_BUDGET_S:
                break
        return model.eval(), time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


@dataclass
class ForeignArtifacts:
    onnx_path: Path  # fixed batch 1, Softmax output, 1001 classes
    calib_dir: Path  # N_CALIB flat PNGs
    heldout_dir: Path  # <dataset class 0–9>/*.png (model output index = class + LABEL_OFFSET)
    images: np.ndarray  # held-out, preprocessed, N×3×48×48
    labels: np.ndarray  # model output indices (synthetic class + LABEL_OFFSET)
    accuracy: float
    preprocess: Preprocess = PREPROCESS


def _export(model, path: Path) -> None:
    import torch

    for m in model.modules():
        if hasattr(m, "literal_batch"):
            m.literal_batch = True
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["probabilities"])


def _build(root: Path) -> None:
    import torch

    model, seconds = _train()
    held, held_y = make_images(N_HELDOUT, seed=11)
    with torch.no_grad():
        pred = model(torch.from_numpy(to_input(held))).argmax(1).numpy()
    acc = float((pred == held_y + LABEL_OFFSET).mean())
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"the foreign test model reached only {acc:.1%} held-out accuracy after {seconds:.0f}s; "
                           f"tests need ≥ {MIN_ACCURACY:.0%}")
    calib, _ = make_images(N_CALIB, seed=5)
    write_pngs(root / "calib", calib, [f"calib_{i:03d}.png" for i in range(N_CALIB)])
    # index folders hold the *dataset* class (0–9), as an ImageNet folder would: output = class + LABEL_OFFSET
    write_pngs(root / "heldout", held, [f"{y}/img_{i:04d}_{CLASS_NAMES[y]}.png" for i, y in enumerate(held_y)])
    _export(model, root / "foreign_mnv3_b1.onnx")
    atomic_write_text(root / "meta.json", json.dumps({"version": VERSION, "accuracy": acc,
                                                      "train_seconds": round(seconds, 2)}, indent=1))


def foreign_model(cache_dir: str | os.PathLike) -> ForeignArtifacts:
    """Train (once per cache dir) and export the foreign-style model; see the module docstring."""
    root = Path(cache_dir) / VERSION
    with locked(Path(cache_dir) / f".{VERSION}.lock"):
        if not (root / "meta.json").exists():
            _build(root)
    meta = json.loads((root / "meta.json").read_text())
    images, paths = load_folder(root / "heldout", PREPROCESS)
    labels = np.array([int(p.parent.name) + LABEL_OFFSET for p in paths], np.int64)
    return ForeignArtifacts(onnx_path=root / "foreign_mnv3_b1.onnx", calib_dir=root / "calib",
                            heldout_dir=root / "heldout", images=images, labels=labels, accuracy=meta["accuracy"])
