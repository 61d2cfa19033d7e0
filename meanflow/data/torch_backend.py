"""The fallback reader: a torch DataLoader over a map-style dataset, fed batch by batch in the contract's order.

Samples are produced exactly as the DALI pipeline produces them: arrays via np.load, cast to float32, flipped along
W, times `scale`; images decoded by Pillow (EXIF orientation applied, converted to RGB), shorter side resized with
round-half-up rounding and bilinear antialiased filtering (DALI's resize with subpixel_scale=False; within a few
grey levels of it), center crop anchored at (size - S + 1) // 2 (DALI's rounding), then (p - 127.5) * (1 / 127.5)
in float32 (bit-identical to DALI's crop_mirror_normalize); prepared latents as their stored (mean, std) rows read
from the memory-mapped shards (latents.LatentShards.rows, the DALI reader's code too). The dataset is keyed by
(item, flip) pairs, so the workers stay stateless and the batch sampler alone carries the order.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import DataError
from .index import DatasetIndex


def load_array(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def load_image(path: str, size: int) -> np.ndarray:
    """uint8 (3, size, size): shorter side to `size`, center crop."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        if min(w, h) != size:
            # round half up, as DALI rounds the longer side: floor(x * size / s + 1/2) in integers
            if w <= h:
                w, h = size, (2 * h * size + w) // (2 * w)
            else:
                w, h = (2 * w * size + h) // (2 * h), size
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im)  # (h, w, 3)
    top, left = (h - size + 1) // 2, (w - size + 1) // 2
    return np.ascontiguousarray(a[top : top + size, left : left + size].transpose(2, 0, 1))  # (3, S, S)


class LatentItemDataset(Dataset):
    """dataset[(i, flip)] -> (mean, std float32 (C, h, w), label): the stored posterior rows of prepared latents,
    row [:, 1] (the flipped image's) when flip is set; the Loader draws the sample from them."""

    def __init__(self, index: DatasetIndex):
        self.shards, self.labels = index.latents, index.labels

    def __len__(self):
        return self.shards.count

    def __getitem__(self, key):
        i, flip = key
        mean, std = self.shards.rows(np.asarray([i]), np.asarray([flip]))  # (1, C, h, w) each
        return torch.from_numpy(mean[0]), torch.from_numpy(std[0]), int(self.labels[i])


class ItemDataset(Dataset):
    """dataset[(i, flip)] -> (x float32 (C, H, W), label)."""

    def __init__(self, index: DatasetIndex, scale: float):
        self.files, self.labels, self.kind = index.files, index.labels, index.kind
        self.size = index.item_shape[-1]
        self.scale = np.float32(scale)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, flip = key
        if self.kind == "npy":
            x = load_array(self.files[i]).astype(np.float32, copy=False)
        else:
            x = (load_image(self.files[i], self.size).astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)
        if flip:
            x = x[..., ::-1]
        if self.scale != 1:
            x = x * self.scale
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.labels[i])


def _leave_stop_signals_to_the_trainer(_worker_id):
    """Workers ignore SIGTERM and SIGINT (a terminal's Ctrl-C and a scheduler's SIGTERM reach every process): a
    worker killed by one makes the trainer's next batch, or its SIGCHLD handler, raise while the trainer is still
    finishing its step and saving (meanflow.trainer.preemption); the trainer shuts the workers down itself."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _PlanSampler:
    """Batch sampler replaying the current epoch's plan; swapped per epoch so persistent workers survive."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class TorchReader:
    name = "torch"

    def __init__(self, index: DatasetIndex, scale: float, num_workers: int):
        if index.kind == "images":
            try:
                import PIL  # noqa: F401
            except ImportError:
                raise DataError("the torch fallback reads images with Pillow: pip install pillow") from None
        self.sampler = _PlanSampler()
        self.loader = DataLoader(
            LatentItemDataset(index) if index.kind == "latents" else ItemDataset(index, scale),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            worker_init_fn=_leave_stop_signals_to_the_trainer,
        )

    def batches(self, idx: np.ndarray, flip: np.ndarray | None):
        """Yield (x, y) for each row of idx (S, B) ((mean, std, y) for prepared latents); flip (S, B) bool or None."""
        if flip is None:
            flip = np.zeros(idx.shape, bool)
        self.sampler.batches = [list(zip(r.tolist(), f.tolist())) for r, f in zip(idx, flip)]
        yield from self.loader

    def close(self):
        """Shut the persistent workers down now: left to garbage collection they outlive the trainer's process by
        seconds (or, when it dies, until their parent-watchdog notices)."""
        it, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
