"""Data for the MeanFlow trainer: sources, validation, and a loader whose order is fixed by (seed, epoch, step).

    loader = build_loader(DataConfig(source="mnist"), global_batch=256, rank=r, world_size=W, seed=0)
    for x, y in loader.epoch(epoch, start_step):   # x float32 (256/W, C, H, W), y int64 (256/W,)

Sources (layouts in index.py): "mnist" (5000 embedded digits, cached as .npy), "npy" (root/<class>/*.npy or flat
root/*.npy, unlabeled), "images" (root/<class>/*.png|jpg), "toy" (2-D points generated in memory, toy.py; x (B, 2)),
"latents" (a `meanflow.prepare latents` folder, found by its manifest.json also under "npy": x is a fresh sample of
each item's stored posterior, latents.py; checksums verified at start, latent_verify.py).
Backends: NVIDIA DALI when importable (loader "auto" or "dali"), else a torch DataLoader; both serve bit-identical
batches (images within a few grey levels when resized). The toy source is served by an in-memory reader.
The order (order.py) makes a W-process run see the same global batches as a 1-process run, and resume exact.
Nothing in a user's data folder is ever written.
"""

from .config import LOADERS, SOURCES, DataConfig, DataError, infer_source
from .index import DatasetIndex, build_dataset_index
from .loader import Loader, build_loader
from .order import epoch_order, rank_steps

__all__ = [
    "DataConfig",
    "DataError",
    "DatasetIndex",
    "Loader",
    "LOADERS",
    "SOURCES",
    "build_dataset_index",
    "build_loader",
    "epoch_order",
    "infer_source",
    "rank_steps",
]
