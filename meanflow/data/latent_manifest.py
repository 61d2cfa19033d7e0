"""Reading and validating the manifest.json of a prepared-latents folder (docs/prepared-latents.md).

A folder is a prepared-latents folder when its manifest.json says `"format": "meanflow-latents"`. Reading it opens
that one file: the shards are described by the manifest, never listed. Validation checks what training relies on:

    format == "meanflow-latents", version == 1, count >= 1, shape = [C, h, w] positive, dtype float16|float32,
    scale_factor > 0, classes a list of names, labels {path, sha256}, and for shard k of shards:
        index == k,  first == sum of the counts before it,  count >= 0,  mean/std/labels paths,  sha256 of each;
    sum of the counts == count.

Every failure is a DataError naming manifest.json and the field (e.g. `shards[3].first`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .config import DataError

MANIFEST = "manifest.json"
FORMAT = "meanflow-latents"
VERSION = 1
DTYPES = ("float16", "float32")
SHARD_FILES = ("mean", "std", "labels")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Shard:
    index: int
    first: int  # item number of the shard's first row
    count: int  # rows in the shard
    paths: dict  # {"mean" | "std" | "labels": absolute path}
    sha256: dict  # {"mean" | "std" | "labels": hex digest}


@dataclass(frozen=True)
class LatentManifest:
    root: str
    path: str  # the manifest file
    count: int
    shape: tuple  # (C, h, w) of one latent
    dtype: np.dtype  # stored dtype of mean and std
    scale_factor: float
    classes: tuple
    labels_path: str
    labels_sha256: str
    shards: tuple  # of Shard, in item order

    @property
    def firsts(self) -> np.ndarray:
        """int64 (S,): item i lives in shard searchsorted(firsts, i, "right") - 1."""
        return np.fromiter((s.first for s in self.shards), np.int64, len(self.shards))


def is_prepared_latents(root: str) -> bool:
    """Whether `root` holds a prepared-latents manifest. A manifest.json that is not JSON counts when a shards/
    folder sits beside it, so that a damaged manifest is reported as such rather than read as an .npy tree."""
    path = os.path.join(os.path.expanduser(root), MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return os.path.isdir(os.path.join(os.path.expanduser(root), "shards"))
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_manifest(root: str) -> LatentManifest:
    """The validated manifest of the prepared folder `root`."""
    root = os.path.abspath(os.path.expanduser(root))
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"data.root: {root} has no {MANIFEST}, so it is not a complete prepared-latents folder "
                        "(python -m meanflow.prepare latents writes the manifest last)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    check = _Checker(path)
    check.that(isinstance(m, dict), "", "must be a JSON object")
    check.that(m.get("format") == FORMAT, "format", f"must be {FORMAT!r}, got {m.get('format')!r}")
    check.that(m.get("version") == VERSION, "version",
               f"is {m.get('version')!r}; this meanflow reads version {VERSION} (re-run prepare, or update meanflow)")
    count = check.integer(m, "count", minimum=1)
    shape = m.get("shape")
    check.that(isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape), "shape",
               f"must be [C, h, w] of positive integers, got {shape!r}")
    check.that(m.get("dtype") in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {m.get('dtype')!r}")
    scale = m.get("scale_factor")
    check.that(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
               and scale > 0, "scale_factor", f"must be a positive number, got {scale!r}")
    classes = m.get("classes")
    check.that(isinstance(classes, list) and all(isinstance(c, str) for c in classes), "classes",
               f"must be a list of class names ([] when unlabeled), got {type(classes).__name__}")
    labels = m.get("labels")
    check.that(isinstance(labels, dict), "labels", "must be an object {path, sha256}")
    labels_path = check.path(root, labels, "path", "labels")
    labels_sha = check.digest(labels, "sha256", "labels")
    shards_raw = m.get("shards")
    check.that(isinstance(shards_raw, list) and shards_raw, "shards", "must be a non-empty list")
    shards, total = [], 0
    for k, s in enumerate(shards_raw):
        where = f"shards[{k}]"
        check.that(isinstance(s, dict), where, "must be an object")
        check.that(s.get("index") == k, f"{where}.index", f"is {s.get('index')!r}, expected {k} (shards in order)")
        first = check.integer(s, "first", minimum=0, where=where)
        check.that(first == total, f"{where}.first", f"is {first}, expected {total} (the sum of the counts before it)")
        n = check.integer(s, "count", minimum=0, where=where)
        digests = s.get("sha256")
        check.that(isinstance(digests, dict), f"{where}.sha256", "must be an object {mean, std, labels}")
        paths = {name: check.path(root, s, name, where) for name in SHARD_FILES}
        sha = {name: check.digest(digests, name, f"{where}.sha256") for name in SHARD_FILES}
        shards.append(Shard(k, first, n, paths, sha))
        total += n
    check.that(total == count, "count", f"is {count} but the shards' counts add up to {total}")
    return LatentManifest(root, path, count, tuple(shape), np.dtype(m["dtype"]), float(scale), tuple(classes),
                          labels_path, labels_sha, tuple(shards))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    """Raises DataError("<manifest path>: field <name> <problem>") on the first failed check."""

    def __init__(self, path: str):
        self.file = path

    def that(self, ok: bool, field: str, problem: str):
        if not ok:
            name = f"field {field} " if field else ""
            raise DataError(f"{self.file}: {name}{problem}")

    def integer(self, obj: dict, key: str, minimum: int, where: str = "") -> int:
        v = obj.get(key)
        self.that(_is_int(v) and v >= minimum, f"{where}.{key}" if where else key,
                  f"must be an integer >= {minimum}, got {v!r}")
        return v

    def path(self, root: str, obj: dict, key: str, where: str) -> str:
        v = obj.get(key)
        self.that(isinstance(v, str) and v != "", f"{where}.{key}", f"must be a file path, got {v!r}")
        return os.path.normpath(os.path.join(root, v))  # relative to the folder (an absolute path stays as it is)

    def digest(self, obj: dict, key: str, where: str) -> str:
        v = obj.get(key)
        self.that(isinstance(v, str) and bool(_SHA256.match(v)), f"{where}.{key}",
                  f"must be a sha256 hex digest (64 lowercase hex digits), got {v!r}")
        return v
