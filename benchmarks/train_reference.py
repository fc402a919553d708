"""Train the reference SE-ResNet-50 (10 Imagenette classes) so INT8/FP16 drift figures mean something.

No pretrained ImageNet weights can be downloaded on the machines sedeploy is developed on, and drift measured on
random weights says little. This script trains the exact mmcls SE-ResNet-50 from scratch on Imagenette
(../shared/data/imagenette/train, 5,000 images) and evaluates on its val split (3,925 images).

Budget: ≤ 60 min on a 2-core CPU. A full-resolution epoch costs ~11–20 min there, so the schedule uses
progressive resizing: most epochs at 64 px (4–5× cheaper), the last ones at 112 px, and evaluation at 112 px with
the mmcls pipeline scaled to that size (resize short side 128, centre crop 112). The trade-off: a lower accuracy
than a 224-px model would reach, in exchange for a model that exists on any machine within the hour. On a GPU
(detected automatically) the same schedule takes minutes; pass --epochs-high/--res-high to train bigger.

Output: an mmcls-format checkpoint ({'meta', 'state_dict'}, keys backbone.*/head.fc.*) in the cache
(default $SEDEPLOY_CACHE/reference or ~/.cache/sedeploy/reference) and a JSON record of its accuracy, which
benchmarks/ commits (benchmarks/results/train_reference/reference_model.json).

    python benchmarks/train_reference.py                    # ≈ 46 min training + evaluation on 2 CPU cores
    python benchmarks/train_reference.py --quick            # 2-minute smoke run on 500 images
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sedeploy.fsutil import atomic_path, atomic_write_text  # noqa: E402
from sedeploy.model import build_model  # noqa: E402
from sedeploy.preprocess import Preprocess, find_images, load_image  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "imagenette"
STORE = 128  # images are kept in memory at 128×128 uint8 (training crops are taken from these)


def cache_dir() -> Path:
    return Path(os.environ.get("SEDEPLOY_CACHE", Path.home() / ".cache" / "sedeploy")) / "reference"


def load_train(root: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    found = find_images(root, what="Imagenette train folder")
    classes = sorted({c for c in found.classes if c})
    idx = list(range(len(found.paths)))
    if limit:
        idx = np.random.default_rng(0).permutation(idx)[:limit].tolist()
    x = torch.empty((len(idx), 3, STORE, STORE), dtype=torch.uint8)
    y = torch.empty(len(idx), dtype=torch.long)
    for k, i in enumerate(idx):
        with Image.open(found.paths[i]) as im:
            im = im.convert("RGB").resize((STORE, STORE), Image.BILINEAR)
            x[k] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        y[k] = classes.index(found.classes[i])
    return x, y, classes


def augment(xb: torch.Tensor, res: int, gen: torch.Generator) -> torch.Tensor:
    """Random-resized crop (scale 0.35–1, ratio 3/4–4/3) + horizontal flip, normalised like mmcls."""
    out = torch.empty((len(xb), 3, res, res))
    for k, img in enumerate(xb.float()):
        area = STORE * STORE * (0.35 + 0.65 * torch.rand(1, generator=gen).item())
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(1, generator=gen).item())
        w = min(STORE, int(round(math.sqrt(area * ratio))))
        h = min(STORE, int(round(math.sqrt(area / ratio))))
        top = int(torch.randint(0, STORE - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, STORE - w + 1, (1,), generator=gen))
        crop = img[:, top:top + h, left:left + w].unsqueeze(0)
        crop = F.interpolate(crop, size=(res, res), mode="bilinear", align_corners=False)[0]
        out[k] = crop.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else crop
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return ((out - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model, root: Path, classes: list[str], res: int, device, limit: int | None = None) -> dict:
    found = find_images(root, what="Imagenette val folder")
    pp = Preprocess.for_size(res)
    paths = found.paths[:limit] if limit else found.paths
    labels = [classes.index(c) for c in found.classes[: len(paths)]]
    model.eval()
    correct, n = 0, 0
    for i in range(0, len(paths), 64):
        xb = torch.from_numpy(np.stack([load_image(p, pp) for p in paths[i:i + 64]])).to(device)
        pred = model(xb.contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
        correct += int((pred == torch.tensor(labels[i:i + 64])).sum())
        n += len(pred)
    return {"top1": correct / n, "images": n, "resolution": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="Imagenette root with train/ and val/")
    ap.add_argument("--res-low", type=int, default=64)
    ap.add_argument("--epochs-low", type=int, default=14)
    ap.add_argument("--res-high", type=int, default=112)
    ap.add_argument("--epochs-high", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--high-frac", type=float, default=0.4, help="share of the schedule trained at --res-high")
    ap.add_argument("--budget-min", type=float, default=46.0,
                    help="training time budget; the LR schedule completes within it (evaluation comes after)")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint path [cache/se-resnet50-imagenette.pth]")
    ap.add_argument("--record", type=Path, default=REPO / "benchmarks" / "results" / "train_reference" / "reference_model.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 images, 1+1 epochs")
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"error: Imagenette not found at {args.data} (expected train/ and val/ subfolders)", file=sys.stderr)
        return 2
    if args.quick:
        args.epochs_low, args.epochs_high, args.budget_min = 1, 1, 1.5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    t0 = time.time()
    x, y, classes = load_train(args.data / "train", 500 if args.quick else None)
    print(f"loaded {len(x)} training images in {time.time() - t0:.0f} s", file=sys.stderr)

    model = build_model(50, num_classes=len(classes), seed=None)
    for m in model.modules():  # zero-init the last BN of each residual branch: standard for training from scratch
        if hasattr(m, "bn3"):
            torch.nn.init.zeros_(m.bn3.weight)
    model = model.to(device).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-5}, {"params": no_decay, "weight_decay": 0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    # Time-budgeted schedule: progress = max(step fraction, time fraction), so the one-cycle LR always completes
    # inside the budget whatever the machine's speed or load; the resolution switches to res-high for the last
    # `high_frac` of progress (progressive resizing: cheap low-res epochs first, high-res fine-tuning last).
    schedule = [args.res_low] * args.epochs_low + [args.res_high] * args.epochs_high
    high_frac = args.high_frac
    steps_per_epoch = len(x) // args.batch
    total = steps_per_epoch * len(schedule)
    budget_s = args.budget_min * 60
    gen = torch.Generator().manual_seed(0)
    step, log, stopped_early, progress = 0, [], False, 0.0
    t_train = time.time()
    epoch = 0
    while progress < 1.0:
        res = args.res_high if progress >= 1 - high_frac else args.res_low
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        running, done = 0.0, 0
        for b in range(steps_per_epoch):
            progress = max(step / total, (time.time() - t_train) / budget_s)
            if progress >= 1.0:
                stopped_early = step < total
                break
            if res == args.res_low and progress >= 1 - high_frac:
                break  # switch to high resolution now
            # one-cycle: linear warm-up for 5 %, cosine decay to 0
            lr = args.lr * (progress / 0.05 if progress < 0.05 else
                            0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[b * args.batch:(b + 1) * args.batch]
            xb, yb = augment(x[idx], res, gen).to(device), y[idx].to(device)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss)
            step += 1
            done += 1
        epoch += 1
        elapsed = (time.time() - t_train) / 60
        mean_loss = running / max(done, 1)
        log.append({"epoch": epoch, "res": res, "steps": done, "loss": round(mean_loss, 4),
                    "minutes": round(elapsed, 2), "progress": round(progress, 3)})
        print(f"epoch {epoch} res {res} steps {done} loss {mean_loss:.3f} ({elapsed:.1f} min, "
              f"progress {progress:.0%})", file=sys.stderr, flush=True)
    train_minutes = (time.time() - t_train) / 60
    model = model.to(memory_format=torch.contiguous_format)
    limit = 500 if args.quick else None
    metrics = {f"val_top1_at_{r}": evaluate(model, args.data / "val", classes, r, device, limit)["top1"]
               for r in sorted({args.res_high, 224})}
    model = model.cpu().eval()
    meta = {"arch": "se-resnet50", "dataset": "imagenette", "classes": classes, "trained_by": "sedeploy",
            "train_resolution": args.res_high, "schedule": [e["res"] for e in log], "metrics": metrics}
    out = args.out or cache_dir() / "se-resnet50-imagenette.pth"
    with atomic_path(out) as tmp:
        torch.save({"meta": meta, "state_dict": model.state_dict()}, tmp)
    record = {"checkpoint": str(out), "device": str(device), "torch": torch.__version__, "threads":
              torch.get_num_threads(), "train_images": len(x), "train_minutes": round(train_minutes, 1),
              "stopped_early": stopped_early, "epochs": log, **metrics, "eval_pipeline":
              "mmcls test pipeline scaled: resize short side size·256/224, centre crop size",
              "quick": args.quick}
    if not args.quick:
        atomic_write_text(args.record, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
