"""Image batches for the encoder: decode, ADM-crop, and batch the images of one shard at a time.

Batches never cross a shard boundary (the caller's batch list guarantees it), so a shard is complete as soon as its
last batch is encoded. Decoding runs in `workers` DataLoader processes with PIL; an image that does not decode is
returned as an error string instead of pixels, never as an exception, so one bad file costs one item, not the run.
With DALI (meanflow/prepare/dali_jpeg.py) the JPEGs are decoded on the GPU instead and only the crop runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .listing import DECODE_ERRORS, center_crop_arr, load_crop


@dataclass
class ImageBatch:
    indices: list  # listing positions of every image of the batch, decodable or not, in order
    ok: list  # the decodable ones, in order: row j of `images` is image ok[j]
    images: torch.Tensor | None  # uint8 (len(ok), 3, S, S), None when no image of the batch decodes
    errors: dict = field(default_factory=dict)  # listing position -> why it did not decode


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class CropDataset(Dataset):
    """Item i: (i, uint8 (S, S, 3) or None, error or None) for the i-th file of the listing."""

    def __init__(self, files: list, size: int):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return i, load_crop(self.files[i], self.size), None
        except DECODE_ERRORS as e:
            return i, None, describe(e)


def collate_crops(items) -> ImageBatch:
    ok = [i for i, arr, _ in items if arr is not None]
    arrays = [arr for _, arr, _ in items if arr is not None]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else None  # (k, 3, S, S)
    return ImageBatch([i for i, _, _ in items], ok, images, {i: err for i, _, err in items if err is not None})


def pil_batches(files: list, batches: list, size: int, workers: int):
    """ImageBatch per entry of `batches` (lists of listing positions), decoded with PIL in `workers` processes."""
    return DataLoader(CropDataset(files, size), batch_sampler=batches, num_workers=workers, collate_fn=collate_crops,
                      prefetch_factor=4 if workers else None)


def crop_batch(indices: list, decoded: list, size: int, pool=None) -> ImageBatch:
    """ImageBatch from decoded HWC uint8 RGB arrays (or error strings) in `decoded`, cropped the ADM way (in `pool`'s
    threads when given: PIL's resize releases the GIL)."""
    from PIL import Image

    def crop(d):
        return d if isinstance(d, str) else center_crop_arr(Image.fromarray(d), size)

    crops = list(pool.map(crop, decoded) if pool is not None else map(crop, decoded))
    return collate_crops([(i, None, c) if isinstance(c, str) else (i, c, None) for i, c in zip(indices, crops)])
