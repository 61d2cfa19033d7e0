"""The in-memory reader: items already held as one array (the "toy" source), served row by row in the contract's
order with plain indexing. No workers and no files: a batch of 2-D points is a gather of a few kilobytes, cheaper
than handing it to a DataLoader worker. Samples are `points[i] * scale` in float32, labels those of the index.
"""

from __future__ import annotations

import numpy as np
import torch

from .index import DatasetIndex


class MemoryReader:
    name = "memory"

    def __init__(self, index: DatasetIndex, scale: float):
        self.points = index.points if scale == 1 else index.points * np.float32(scale)  # (N, *item_shape) float32
        self.labels = index.labels

    def batches(self, idx: np.ndarray, flip: np.ndarray | None):
        """Yield (x, y) for each row of idx (S, B); the memory source has no flips (data.hflip is refused)."""
        assert flip is None, "the in-memory source takes no flips"
        for row in idx:
            yield torch.from_numpy(self.points[row]), torch.from_numpy(self.labels[row])

    def close(self):
        """Nothing to end: no workers."""
