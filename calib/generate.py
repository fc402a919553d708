"""Regenerate the shipped calibration images from scikit-image's public-domain / CC0 sample data.

    python calib/generate.py          # needs scikit-image; writes calib/*.jpg

Each source image contributes its full frame plus a few crops (different framing gives the calibration more
variety than 13 photos alone). Short side ≤ 320 px, JPEG quality 90: the folder stays about 1 MB.
"""
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

#: name → (loader, crop boxes as fractions (left, top, right, bottom))
SOURCES = {
    "astronaut": ["astronaut", [(0.1, 0.0, 0.7, 0.6), (0.3, 0.3, 1.0, 1.0)]],
    "chelsea": ["chelsea", [(0.2, 0.0, 0.8, 0.9)]],
    "coffee": ["coffee", [(0.15, 0.0, 0.75, 0.9), (0.5, 0.3, 1.0, 1.0)]],
    "rocket": ["rocket", [(0.25, 0.0, 0.75, 0.8), (0.0, 0.4, 0.6, 1.0)]],
    "hubble_deep_field": ["hubble_deep_field", [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]],
    "retina": ["retina", [(0.2, 0.2, 0.8, 0.8)]],
    "immunohistochemistry": ["immunohistochemistry", [(0.0, 0.0, 0.6, 0.6)]],
    "camera": ["camera", [(0.2, 0.0, 0.9, 0.7)]],
    "horse": ["horse", []],
    "coins": ["coins", [(0.0, 0.2, 0.6, 1.0)]],
    "brick": ["brick", []],
    "grass": ["grass", []],
    "gravel": ["gravel", []],
    "cell": ["cell", []],
}


def to_rgb(img: np.ndarray) -> Image.Image:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = (255 * (img - img.min()) / max(1e-9, float(img.max() - img.min()))).astype(np.uint8)
    pil = Image.fromarray(img)
    return pil.convert("RGB")


def save(img: Image.Image, path: Path) -> None:
    scale = 320 / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    img.save(path, quality=90)


def main() -> None:
    out = Path(__file__).resolve().parent
    for name, (loader, crops) in SOURCES.items():
        img = to_rgb(getattr(data, loader)())
        save(img, out / f"{name}.jpg")
        for i, (l, t, r, b) in enumerate(crops):
            w, h = img.size
            save(img.crop((round(l * w), round(t * h), round(r * w), round(b * h))), out / f"{name}_crop{i + 1}.jpg")


if __name__ == "__main__":
    main()
