"""Which images `prepare latents` encodes, in which order, and how each is cropped.

Listing: the rule of the "images" data source (meanflow/data/index.py, reused as is): class folders sorted by name
(label = position), files sorted within a class, extensions .png/.jpg/.jpeg in any case, hidden entries skipped; or a
flat folder of images (unlabeled: every label 0, no classes).

Crop: ADM's `center_crop_arr` (guided-diffusion, image_datasets.py), the preprocessing of the paper's ImageNet 256
latents: while the shorter side is >= 2 S, halve the image with a BOX filter (cheap antialiasing); then resize with
BICUBIC so the shorter side is S (each side round(side * S / min side)); then take the central S x S crop
(offsets floor((H - S) / 2), floor((W - S) / 2)).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

from meanflow.data.config import DataError
from meanflow.data.index import IMAGE_EXTENSIONS, _scan

# What PIL raises for a file it cannot decode: not an image, truncated data, a decompression bomb, broken PNG chunks.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class PrepareError(ValueError):
    """Bad input to `prepare`: the message names the option, folder or file at fault."""


def list_images(root: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of an image folder in listing order; a PrepareError naming --images if unusable."""
    if not os.path.isdir(root):
        raise PrepareError(f"--images {root}: no such folder")
    try:
        files, labels, classes = _scan(root, IMAGE_EXTENSIONS, "image (.png/.jpg/.jpeg)")
    except DataError as e:
        raise PrepareError(f"--images: {e}") from None
    return files, labels, list(classes)


def listing_sha256(root: str, files: list[str], labels: list[int]) -> str:
    """sha256 over the listing (paths relative to root, and labels): two runs encode the same items iff it matches."""
    h = hashlib.sha256()
    for path, label in zip(files, labels):
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return h.hexdigest()


def center_crop_arr(pil_image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop (module docstring) of an RGB PIL image: uint8 (size, size, 3)."""
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)  # (H, W, 3)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_crop(path: str, size: int) -> np.ndarray:
    """Decode `path` with PIL (fully, so truncated files fail here), convert to RGB, ADM-crop to (size, size, 3)."""
    with Image.open(path) as image:
        image.load()
        return center_crop_arr(image.convert("RGB"), size)
