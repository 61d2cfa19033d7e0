"""build_loader: the index, the ordering contract and a backend (DALI, the torch fallback, or the in-memory reader:
the toy source's, and the npy and mnist sources' under data.loader=memory) put together.

Prepared latents: the backend serves each item's stored posterior (mean, std) rows and the Loader turns them into
x = data.scale * (mean + std * eps) with eps drawn for the whole global batch from (seed, epoch, step) (latents.py),
after the folder's checksums are verified (data.verify, latent_verify.py).
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import torch

from .config import DataConfig, DataError
from .index import DatasetIndex, build_dataset_index
from .latents import posterior_noise, posterior_sample
from .order import epoch_order, rank_steps

log = logging.getLogger(__name__)
_warned_fallback = False


class Loader:
    """Serves rank `rank`'s share of every global batch; see order.py for the exact order."""

    def __init__(self, index: DatasetIndex, cfg: DataConfig, global_batch: int, rank: int, world_size: int,
                 seed: int, reader):
        self.index, self.cfg = index, cfg
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.num_items = index.num_items
        self.item_shape = tuple(index.item_shape)
        self.num_classes = index.num_classes
        self.steps_per_epoch = self.num_items // global_batch
        self.local_batch = global_batch // world_size
        self.backend = reader.name
        self._reader = reader

    def indices(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """Item indices (steps_per_epoch - start_step, global_batch // world_size) this rank reads in `epoch`."""
        self._check(epoch, start_step)
        perm, _ = epoch_order(self.num_items, self.seed, epoch, False)
        return rank_steps(perm, self.global_batch, self.world_size, self.rank, start_step)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (x float32 (B, C, H, W), y int64 (B,)), B = global_batch // world_size, for steps
        start_step .. steps_per_epoch - 1 of `epoch`. Consume one epoch's iterator before starting the next."""
        self._check(epoch, start_step)
        perm, flip = epoch_order(self.num_items, self.seed, epoch, self.cfg.hflip)
        idx = rank_steps(perm, self.global_batch, self.world_size, self.rank, start_step)  # (S, B)
        batches = self._reader.batches(idx, None if flip is None else flip[idx])
        return self._posterior_samples(batches, epoch, start_step) if self.index.kind == "latents" else batches

    def _posterior_samples(self, batches, epoch: int, start_step: int):
        """(x, y) from the reader's (mean, std, y): x = scale * (mean + std * eps), this rank's rows of the global
        batch's eps."""
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        try:
            for step, (mean, std, y) in enumerate(batches, start_step):
                eps = posterior_noise(self.seed, epoch, step, self.global_batch, self.item_shape)[lo:hi]  # (B, C, h, w)
                yield posterior_sample(mean, std, eps, self.cfg.scale), y
        finally:  # an abandoned epoch ends the reader's epoch too
            if hasattr(batches, "close"):
                batches.close()

    def step_items(self, epoch: int, step: int) -> np.ndarray:
        """Item indices (global_batch,) of global step `step` of `epoch`: every rank's rows, rank 0's first (rank r
        reads [r * local_batch:(r + 1) * local_batch]), so a row of any rank's batch maps back to its file."""
        self._check(epoch, step)
        perm, _ = epoch_order(self.num_items, self.seed, epoch, False)
        return perm[step * self.global_batch : (step + 1) * self.global_batch]

    def describe(self, item: int) -> str:
        """The file of an item, with its index (for the mnist source, the file is in the cache; for the toy source,
        the point's index in the generated set)."""
        if self.index.points is not None:
            return f"{self.index.root} point {int(item)} (data.toy_seed {self.cfg.toy_seed})"
        if self.index.latents is not None:
            return self.index.latents.describe(item)
        where = " of the mnist cache" if self.cfg.source == "mnist" else ""
        return f"{self.index.files[item]} (item {int(item)}{where})"

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self):
        """End the reader's worker processes or threads now (the trainer calls it however its loop ends)."""
        self._reader.close()

    def _check(self, epoch, start_step):
        if not (isinstance(epoch, (int, np.integer)) and epoch >= 0):
            raise DataError(f"epoch must be an integer >= 0, got {epoch!r}")
        if not (isinstance(start_step, (int, np.integer)) and 0 <= start_step <= self.steps_per_epoch):
            raise DataError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step!r}")

    def __repr__(self):
        return (f"Loader({self.cfg.source} {self.index.root}: {self.num_items} items {self.item_shape}, "
                f"{self.num_classes} classes, {self.steps_per_epoch} steps of {self.global_batch} "
                f"(rank {self.rank}/{self.world_size}), backend={self.backend})")


def _choose_backend(cfg: DataConfig) -> str:
    global _warned_fallback
    if cfg.loader == "torch":
        return "torch"
    from .dali_backend import dali_available

    if dali_available():
        return "dali"
    if cfg.loader == "dali":
        raise DataError("data.loader=dali but NVIDIA DALI is not importable: pip install nvidia-dali-cuda130 "
                        "(or set data.loader=auto/torch)")
    if not _warned_fallback:
        log.warning("NVIDIA DALI is not importable: reading data with the torch DataLoader fallback "
                    "(pip install nvidia-dali-cuda130 for the DALI pipeline)")
        _warned_fallback = True
    return "torch"


def build_loader(cfg: DataConfig, global_batch: int, rank: int, world_size: int, seed: int) -> Loader:
    cfg.validate()
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(f"rank {rank!r} / world_size {world_size!r}: need 0 <= rank < world_size")
    if not (isinstance(global_batch, int) and global_batch >= 1):
        raise DataError(f"global_batch must be a positive integer, got {global_batch!r}")
    if global_batch % world_size:
        raise DataError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    index = build_dataset_index(cfg)
    if global_batch > index.num_items:
        raise DataError(f"global_batch {global_batch} exceeds the {index.num_items} items in {index.root}")
    if index.kind == "latents":
        _check_latents(index, cfg, rank, world_size)
    elif index.kind == "npy" and cfg.hflip and rank == 0 and cfg.source != "mnist":
        log.warning("data.hflip on %s flips each array along its width; if they are VAE latents, a flipped latent "
                    "is not the latent of the flipped image: prepare the images with `python -m meanflow.prepare "
                    "latents` (it stores the flipped image's latent, which data.hflip then picks) or set "
                    "--data.hflip=false", index.root)
    if cfg.loader == "memory" and index.kind not in ("memory", "npy"):
        raise DataError(f"data.loader=memory holds arrays in memory (the npy and mnist sources); the {cfg.source} "
                        f"source reads {index.kind}: set data.loader=auto (or dali / torch)")
    backend = "memory" if index.kind == "memory" or cfg.loader == "memory" else _choose_backend(cfg)
    if backend == "memory":
        from .memory_backend import MemoryReader, load_npy_items

        items = index.points if index.kind == "memory" else load_npy_items(index)
        reader = MemoryReader(items, index.labels, cfg.scale)
    elif backend == "dali":
        from .dali_backend import DaliReader

        reader = DaliReader(index, cfg.scale, cfg.num_workers)
    else:
        from .torch_backend import TorchReader

        reader = TorchReader(index, cfg.scale, cfg.num_workers)
    return Loader(index, cfg, global_batch, rank, world_size, int(seed), reader)


def _check_latents(index: DatasetIndex, cfg: DataConfig, rank: int, world_size: int) -> None:
    """data.verify's checksum pass (every rank takes part), and a warning when data.scale is not the VAE's."""
    m = index.latents.manifest
    if cfg.verify:
        from .latent_verify import verify_latents

        verify_latents(m, rank, world_size, threads=max(1, cfg.num_workers))
    if rank == 0 and not math.isclose(cfg.scale, m.scale_factor, rel_tol=1e-6):
        log.warning("data.scale %g differs from the scale_factor %g in %s: training samples are data.scale * latent "
                    "(set --data.scale=%g to train on the VAE's unit-variance latents)", cfg.scale, m.scale_factor,
                    m.path, m.scale_factor)
