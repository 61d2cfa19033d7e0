"""data.verify: every file of a prepared-latents folder checked against the manifest's sha256, once, at start.

One pass before training, split over the ranks: rank r hashes the files of shards s with s % world_size == r (mean,
std and labels-*.npy) and rank 0 also labels.npy. The cost is reading the whole folder once: at ImageNet's 1.28M
items in float16 that is ~42 GB, i.e. bytes / (ranks x hash rate) seconds, at 0.9-1.1 GB/s of SHA-256 per thread
measured here (2-core CPU; threads: data.num_workers, at least 1) unless the disk is slower. A resume verifies again;
--data.verify=false skips the check (the shards' shapes and dtypes are still checked when first opened).

Under torchrun every rank must learn of a bad file that another rank hashed, or it would wait in the trainer's next
collective forever: the ranks all-reduce (max) one status per file (0 good, 1 checksum mismatch, 2 unreadable), so
all of them raise the same DataError naming every bad file. Without a process group each rank reports its own share.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .config import DataError
from .latent_manifest import SHARD_FILES, LatentManifest

log = logging.getLogger(__name__)
GOOD, MISMATCH, UNREADABLE = 0, 1, 2
_CHUNK = 8 << 20  # bytes per read: large enough that hashlib releases the GIL and threads overlap


def checked_files(m: LatentManifest) -> list[tuple[str, str, int]]:
    """[(path, expected sha256, shard or -1 for labels.npy)] in manifest order: 3 per shard, then labels.npy."""
    files = [(s.paths[name], s.sha256[name], s.index) for s in m.shards for name in SHARD_FILES]
    return files + [(m.labels_path, m.labels_sha256, -1)]


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _status(path: str, expected: str) -> int:
    try:
        return GOOD if sha256_of(path) == expected else MISMATCH
    except OSError:
        return UNREADABLE


def verify_latents(m: LatentManifest, rank: int, world_size: int, threads: int = 1) -> None:
    """Hash this rank's share of the folder, agree with the other ranks, raise DataError naming each bad file."""
    files = checked_files(m)
    mine = [k for k, (_, _, shard) in enumerate(files) if (shard if shard >= 0 else 0) % world_size == rank]
    status = np.zeros(len(files), np.int64)  # (F,)
    sizes = {k: _size(files[k][0]) for k in mine}
    start = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=sum(sizes.values()), desc="verify latents", unit="B", unit_scale=True, file=sys.stderr,
              disable=True if rank else None, dynamic_ncols=True) as bar:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for k, s in zip(mine, pool.map(lambda k: _status(*files[k][:2]), mine)):
                status[k] = s
                bar.update(sizes[k])
    seconds = time.perf_counter() - start
    status = _agree(status, world_size)
    bad = [(files[k][0], int(s)) for k, s in enumerate(status) if s != GOOD]
    if bad:
        listed = "; ".join(f"{path}: {'sha256 does not match' if s == MISMATCH else 'cannot be read'}"
                           for path, s in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"prepared latents {m.root}: {listed}{more}, checked against {m.path}: the folder is damaged "
                        "or was changed since it was prepared; prepare it again (data.verify=false skips this check)")
    if rank == 0:
        total = sum(sizes.values())
        log.info("data.verify: %d files of %s (%.1f MB, rank 0's share of %d ranks) match their sha256 in %.1f s "
                 "(%.0f MB/s; --data.verify=false skips this)", len(mine), m.root, total / 1e6, world_size, seconds,
                 total / 1e6 / max(seconds, 1e-9))


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _agree(status: np.ndarray, world_size: int) -> np.ndarray:
    """The element-wise max of every rank's status when this process is one of `world_size` torchrun ranks."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        return status
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.from_numpy(status).to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.cpu().numpy()
