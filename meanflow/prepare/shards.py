"""The prepared-latents folder on disk (docs/prepared-latents.md): shard files, done records, manifest.

Crash safety rests on two rules. Every file is written under a temporary name, flushed to disk and moved into place
with os.replace (atomic on POSIX), so a name either holds a complete file or does not exist. And the order is arrays,
then the shard's done record, then (after every shard) labels.npy, then manifest.json: a done record vouches for
arrays already in place (their sha256 is in it), and the manifest for every done record. A killed run therefore
leaves shards that are done or redone from scratch, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

MANIFEST = "manifest.json"
LABELS = "labels.npy"
SHARDS = "shards"
ARRAYS = ("mean", "std", "labels")


def shard_file(kind: str, index: int) -> str:
    """The name of a shard's file inside shards/: mean-00000.npy, std-..., labels-..., done-00000.json."""
    return f"{kind}-{index:05d}.json" if kind == "done" else f"{kind}-{index:05d}.npy"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _replace_durably(write, path: str):
    """write(file object) to path + ".partial", fsync, then os.replace into `path`."""
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: str, array: np.ndarray) -> str:
    """np.save (format 1.0, C order) atomically; returns the file's sha256."""
    _replace_durably(lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False), path)
    return sha256_file(path)


def save_json_atomic(path: str, obj) -> None:
    _replace_durably(lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()), path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_shard(out: str, index: int, first_image: int, num_images: int, mean: np.ndarray, std: np.ndarray,
                labels: np.ndarray, skipped: list, settings: dict) -> dict:
    """The shard's three arrays, then its done record (returned). mean/std: (n_s, 2, C, h, w); labels: int64 (n_s,).

    `settings` (VAE hash, size, dtype, shard size, listing hash) goes into the record so that a restart with other
    settings is refused instead of mixing shards of two runs.
    """
    folder = os.path.join(out, SHARDS)
    files = {}
    for kind, array in zip(ARRAYS, (mean, std, labels)):
        name = shard_file(kind, index)
        files[kind] = {"name": name, "sha256": save_npy_atomic(os.path.join(folder, name), array)}
    record = {"shard": index, "first_image": first_image, "num_images": num_images, "count": int(len(labels)),
              "skipped": skipped, "files": files, "settings": settings}
    save_json_atomic(os.path.join(folder, shard_file("done", index)), record)
    return record


def read_done(out: str, index: int) -> dict | None:
    """The shard's done record, or None when there is none (or it is unreadable: then the shard is redone)."""
    path = os.path.join(out, SHARDS, shard_file("done", index))
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def done_record_problem(out: str, record: dict) -> str | None:
    """Why a done record's files cannot be trusted (missing, checksum mismatch), or None when all three verify."""
    for kind in ARRAYS:
        entry = record["files"][kind]
        path = os.path.join(out, SHARDS, entry["name"])
        if not os.path.isfile(path):
            return f"{entry['name']} is missing"
        if sha256_file(path) != entry["sha256"]:
            return f"{entry['name']} does not match its sha256"
    return None


def assemble_manifest(out: str, records: list[dict], header: dict) -> dict:
    """labels.npy from the shards' labels, then manifest.json (atomically, last). `records` in shard order."""
    firsts, total = [], 0
    for record in records:
        firsts.append(total)
        total += record["count"]
    labels = np.concatenate([np.load(os.path.join(out, SHARDS, r["files"]["labels"]["name"])) for r in records]
                            ).astype(np.int64) if records else np.zeros(0, np.int64)
    assert len(labels) == total, "shard counts disagree with their labels files"
    labels_sha = save_npy_atomic(os.path.join(out, LABELS), labels)
    shards = [{"index": r["shard"], "first": first, "count": r["count"],
               **{kind: f"{SHARDS}/{r['files'][kind]['name']}" for kind in ARRAYS},
               "sha256": {kind: r["files"][kind]["sha256"] for kind in ARRAYS}}
              for r, first in zip(records, firsts)]
    skipped = [s for r in records for s in r["skipped"]]
    manifest = {"format": "meanflow-latents", "version": 1, "count": total, **header, "shards": shards,
                "labels": {"path": LABELS, "sha256": labels_sha}, "skipped": skipped, "skipped_count": len(skipped)}
    save_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest
