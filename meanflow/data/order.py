"""The ordering contract shared by every backend, rank count and resume point.

For epoch e: rng = np.random.default_rng((seed, e)); perm = rng.permutation(N); then, only with hflip,
flip = rng.random(N) < 0.5, a flag per *item* (not per position), so an item flips the same way whichever rank or
backend reads it. Global step s uses perm[s*G:(s+1)*G] (the N % G tail is dropped); rank r of W takes the contiguous
slice [r*G/W:(r+1)*G/W] of that batch. So concatenating the ranks' batches gives the 1-process batch, ranks are
disjoint, and resuming at step s reads exactly perm[s*G:] and nothing before it.
"""

from __future__ import annotations

import numpy as np


def epoch_order(num_items: int, seed: int, epoch: int, hflip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(perm int64 (N,), flip bool (N,) indexed by item, or None without hflip)."""
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(num_items)
    flip = rng.random(num_items) < 0.5 if hflip else None
    return perm, flip


def rank_steps(perm: np.ndarray, global_batch: int, world_size: int, rank: int, start_step: int) -> np.ndarray:
    """Item indices (steps_per_epoch - start_step, global_batch // world_size) this rank reads, step by step."""
    steps = len(perm) // global_batch
    local = global_batch // world_size
    batches = perm[: steps * global_batch].reshape(steps, global_batch)  # (S, G)
    return batches[start_step:, rank * local : (rank + 1) * local]  # (S - start, G / W)
