"""Prepared latents (docs/prepared-latents.md): the index of a prepared folder, its rows, and the training sample.

The index reads two files whatever the item count: manifest.json (latent_manifest.py) and labels.npy (memory-mapped:
int64 (N,), its values checked against the class list). Shard arrays are memory-mapped on first use, so a batch reads
only its own rows. Item i lives in shard s = searchsorted(firsts, i, "right") - 1 at row i - firsts[s]; a shard's
mean and std are (n_s, 2, C, h, w) with [:, 1] the posterior of the horizontally flipped image.

A training sample is drawn afresh from the stored posterior at every step:

    x = scale * (mean + std * eps),   eps ~ N(0, I) of shape (global_batch, C, h, w)

eps comes from a torch.Generator seeded by (train.seed, epoch, step) and is drawn for the whole global batch, of which
a rank takes its own rows [rank * B, (rank + 1) * B): the samples do not depend on the world size, the backend or a
resume. With data.hflip the item's flip flag selects the stored flipped row (mean[:, 1], std[:, 1]); a latent is
never flipped, because the flip of an SD-VAE latent is not the latent of the flipped image.
"""

from __future__ import annotations

import resource
from collections import OrderedDict

import numpy as np
import torch

from .config import DataError
from .latent_manifest import LatentManifest, read_manifest

_NOISE_STREAM = 0x4C41544E  # "LATN": keeps eps independent of the trainer's per-step noise, seeded by (seed, step)
_SPARE_FILES = 256  # file descriptors left for everything else when sizing the cache of open shards


def read_labels(m: LatentManifest) -> np.ndarray:
    """labels.npy memory-mapped, checked: int64 (count,), values in [0, len(classes)) (all 0 when unlabeled)."""
    try:
        labels = np.load(m.labels_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the labels file {m.labels_path} (manifest field labels.path): {e}") from None
    if labels.dtype != np.int64 or labels.shape != (m.count,):
        raise DataError(f"labels file {m.labels_path} is {labels.dtype} {labels.shape}; {m.path} needs int64 "
                        f"({m.count},)")
    if m.count:
        top = max(1, len(m.classes))
        lo, hi = int(labels.min()), int(labels.max())  # one pass over 8 bytes per item (10 MB at ImageNet's count)
        if lo < 0 or hi >= top:
            raise DataError(f"labels file {m.labels_path} holds labels in [{lo}, {hi}] but {m.path} lists "
                            f"{len(m.classes)} classes (labels must lie in [0, {top - 1}])")
    return labels


class LatentShards:
    """Rows of the shard arrays by item number. Open arrays are cached (least recently used first out) up to what the
    process's open-file limit allows: each memory map holds a file descriptor."""

    def __init__(self, manifest: LatentManifest):
        self.manifest = manifest
        self.firsts = manifest.firsts  # (S,)
        self.count = manifest.count
        self.capacity = _open_file_budget(2 * len(manifest.shards))
        self._open = OrderedDict()  # (shard, "mean" | "std") -> memmap (n_s, 2, C, h, w)

    def __getstate__(self):  # DataLoader workers open their own maps
        return {**self.__dict__, "_open": OrderedDict()}

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) int64 arrays for item numbers `items`."""
        shard = np.searchsorted(self.firsts, items, side="right") - 1
        return shard, items - self.firsts[shard]

    def describe(self, item: int) -> str:
        s, row = self.locate(np.asarray([item]))
        return f"{self.manifest.shards[s[0]].paths['mean']} row {row[0]} (item {int(item)})"

    def rows(self, items: np.ndarray, flips: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float32 (B, C, h, w) of items (B,), row [:, 1] where flips (B,) bool is set."""
        items = np.asarray(items, np.int64)
        side = np.zeros(len(items), np.int64) if flips is None else np.asarray(flips, bool).astype(np.int64)
        shard, row = self.locate(items)
        mean = np.empty((len(items), *self.manifest.shape), np.float32)
        std = np.empty_like(mean)
        for s in np.unique(shard):
            sel = shard == s
            mean[sel] = self._array(int(s), "mean")[row[sel], side[sel]]  # (k, C, h, w), cast to float32
            std[sel] = self._array(int(s), "std")[row[sel], side[sel]]
        return mean, std

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        a = self._open.get(key)
        if a is not None:
            self._open.move_to_end(key)
            return a
        a = open_shard_array(self.manifest, shard, name)
        self._open[key] = a
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return a


def open_shard_array(m: LatentManifest, shard: int, name: str) -> np.ndarray:
    """Memory-map one shard array, checking its shape and dtype against the manifest."""
    s = m.shards[shard]
    path = s.paths[name]
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:  # missing, not an .npy, or shorter than its header says
        raise DataError(f"cannot read shard file {path} (shards[{shard}].{name} of {m.path}): {e}") from None
    want = (s.count, 2, *m.shape)
    if a.shape != want or a.dtype != m.dtype or not a.flags.c_contiguous:
        raise DataError(f"shard file {path} is {a.dtype} {a.shape}{'' if a.flags.c_contiguous else ' Fortran order'}"
                        f"; {m.path} says {m.dtype} {want} in C order")
    return a


def open_latents(root: str) -> tuple[LatentManifest, LatentShards, np.ndarray]:
    """(manifest, shards, labels) of the prepared folder `root`: reads manifest.json and maps labels.npy, nothing
    else."""
    m = read_manifest(root)
    return m, LatentShards(m), read_labels(m)


def noise_seed(seed: int, epoch: int, step: int) -> int:
    """The torch.Generator seed of eps at (train.seed, epoch, step within the epoch)."""
    state = np.random.SeedSequence([_NOISE_STREAM, int(seed), int(epoch), int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)


def posterior_noise(seed: int, epoch: int, step: int, global_batch: int, shape: tuple) -> torch.Tensor:
    """eps float32 (global_batch, *shape): the whole global batch's, so that every world size draws the same."""
    gen = torch.Generator().manual_seed(noise_seed(seed, epoch, step))
    return torch.randn((global_batch, *shape), generator=gen)


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scale: float) -> torch.Tensor:
    """x = scale * (mean + std * eps), float32 (B, C, h, w)."""
    x = mean + std * eps
    return x * scale if scale != 1 else x


def _open_file_budget(wanted: int) -> int:
    """How many shard arrays may stay open: all of them when the soft RLIMIT_NOFILE allows (raised toward the hard
    limit if needed), else what the limit leaves after _SPARE_FILES."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(8, min(wanted, soft - _SPARE_FILES))
