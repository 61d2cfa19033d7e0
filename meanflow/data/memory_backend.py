"""The in-memory reader: every item held in one float32 array, served row by row in the contract's order by plain
indexing. No workers and no per-item reads: a batch is one gather.

It serves the toy source (its 2-D points are generated in memory), and arrays (the npy and mnist sources) under
data.loader=memory, read once at start (load_npy_items). For a small set that is the cheap way on a CPU: the demo's
5000 digits take 20 MB, and the torch DataLoader's two workers, each reading 96 files a step, took CPU time from the
two training threads (300 demo steps: 59-61 s against 52-53 s with no workers, the files read in the training
process; this reader against the workers: 41-52 s against 42-46 s on a quicker, noisier hour). Samples are
`item * scale` in float32, flipped along W where the contract's flip is set: the fallback reader's values to the bit.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .config import DataError
from .index import DatasetIndex
from .torch_backend import load_array

MAX_MEMORY_BYTES = 8 << 30  # data.loader=memory refuses sets larger than this as float32
_PROGRESS_FROM = 20_000  # items; fewer load in a second or two


def load_npy_items(index: DatasetIndex) -> np.ndarray:
    """The items of an "npy" index as one float32 array (N, *item_shape), each file read once, in index order."""
    n = len(index.files)
    nbytes = n * math.prod(index.item_shape) * 4
    if nbytes > MAX_MEMORY_BYTES:
        raise DataError(f"data.loader=memory: the {n} items of {index.root} take {nbytes / 2**30:.1f} GiB as float32, "
                        f"over its {MAX_MEMORY_BYTES / 2**30:.0f} GiB limit; set data.loader=auto (or dali / torch)")
    from tqdm import tqdm

    items = np.empty((n, *index.item_shape), np.float32)
    for i, path in enumerate(tqdm(index.files, desc="data: reading into memory", unit="item", file=sys.stderr,
                                  disable=n < _PROGRESS_FROM, leave=False)):
        items[i] = load_array(path)  # the assignment casts to float32 as the fallback's astype does
    return items


class MemoryReader:
    name = "memory"

    def __init__(self, items: np.ndarray, labels: np.ndarray, scale: float):
        """items (N, *item_shape) float32, labels (N,) int64."""
        self.items = items if scale == 1 else items * np.float32(scale)
        self.labels = labels

    def batches(self, idx: np.ndarray, flip: np.ndarray | None):
        """Yield (x, y) for each row of idx (S, B), flip (S, B) bool or None."""
        for s, row in enumerate(idx):
            x = self.items[row]  # (B, *item_shape), a copy
            if flip is not None and flip[s].any():
                x[flip[s]] = x[flip[s]][..., ::-1]
            yield torch.from_numpy(x), torch.from_numpy(self.labels[row])

    def close(self):
        """Nothing to end: no workers."""
