"""The dataset index: the ordered list of sample files, their labels and the sample shape, validated up front.

Folder layouts (only read, never written):
- "npy":    root/<class_name>/*.npy   one float array (C, H, W) per sample; label = index of the class folder among
                                      the sorted sub-folder names (hidden ones, starting with ".", are skipped)
            root/*.npy                unlabeled: every label is 0 and num_classes is 0 (unconditional training)
  All arrays must share one shape and one float dtype (float16/32/64); they are served as float32.
- "images": root/<class_name>/*.{png,jpg,jpeg} (or flat root/*.png ... for unlabeled data), any size, served as
            RGB (3, S, S): shorter side resized to S (bilinear, antialiased), center crop, pixels mapped to [-1, 1].
- "mnist":  the embedded 5000 MNIST digits, cached once as the "npy" layout (see mnist.py).
- "latents": a folder written by `python -m meanflow.prepare latents` (docs/prepared-latents.md), recognised by its
            manifest.json (source "latents", or "npy" on such a folder): indexed from the manifest and labels.npy
            alone (latents.py), `files` empty, `latents` the shard rows; served as posterior samples (loader.py).
- "toy":    no folder: data.toy_points 2-D points of the distribution data.toy drawn with data.toy_seed (toy.py),
            held in memory as `points` (N, 2) float32, unlabeled; `files` is empty and `root` reads "toy:<name>".
Item order is class folders sorted by name, then file names sorted within each folder. Files with other
extensions are ignored; an empty class folder is an error (it would silently shift the labels of the rest).

Validation is cheap and complete: every .npy header is parsed (and its size checked against the file length, so a
truncated file is caught), every image's first bytes are checked against the PNG/JPEG signatures. Each failure is a
DataError naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .config import DataConfig, DataError
from .latent_manifest import is_prepared_latents
from .latents import LatentShards, open_latents
from .toy import toy_points

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class DatasetIndex:
    kind: str  # "npy" (arrays on disk), "images" (encoded PNG/JPEG), "latents" (prepared shards) or "memory"
    root: str
    files: tuple  # absolute paths, in index order
    labels: np.ndarray  # int64 (N,)
    classes: tuple  # class folder names; () when unlabeled
    item_shape: tuple  # (C, H, W) of a served sample
    dtype: np.dtype  # stored dtype of the arrays ("npy"); uint8 for images
    points: np.ndarray | None = None  # "memory": the items themselves (N, *item_shape) float32
    latents: LatentShards | None = None  # "latents": the shard rows (its .manifest is the folder's manifest)

    @property
    def num_items(self) -> int:
        if self.latents is not None:
            return self.latents.count
        return len(self.files) if self.points is None else len(self.points)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_dataset_index(cfg: DataConfig) -> DatasetIndex:
    """Scan and validate the data named by `cfg` (building the mnist cache on first use)."""
    cfg.validate()
    if cfg.source == "toy":
        points = toy_points(cfg.toy, cfg.toy_points, cfg.toy_seed)  # (N, 2)
        return DatasetIndex("memory", f"toy:{cfg.toy}", (), np.zeros(len(points), np.int64), (), points.shape[1:],
                            points.dtype, points)
    if cfg.source == "mnist":
        from .mnist import ensure_mnist_cache

        return _index_npy(ensure_mnist_cache(cfg.root))
    root = os.path.abspath(os.path.expanduser(cfg.root))
    if cfg.source == "latents" or (cfg.source == "npy" and is_prepared_latents(root)):
        return _index_latents(root)
    if cfg.source == "npy":
        return _index_npy(root)
    return _index_images(root, cfg.image_size)


def _scan(root: str, extensions: tuple, what: str) -> tuple[list[str], list[int], tuple]:
    """Files (absolute, index order), their labels, and the class names of a class-folder or flat layout."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist or is not a folder (data.root)")

    def matching(folder):
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries if e.is_file() and not e.name.startswith(".")
                          and e.name.lower().endswith(extensions))

    flat = matching(root)
    with os.scandir(root) as entries:
        class_dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if flat:
        mixed = [d for d in class_dirs if matching(os.path.join(root, d))]
        if mixed:
            raise DataError(
                f"data folder {root} mixes {what} files at the top level with class folders ({mixed[0]}/, ...): "
                f"use either root/<class>/*{extensions[0]} (labeled) or root/*{extensions[0]} (unlabeled)"
            )
        return flat, [0] * len(flat), ()
    if not class_dirs:
        raise DataError(
            f"data folder {root} has no {what} files (expected root/<class>/*{extensions[0]} or root/*{extensions[0]})"
        )
    files, labels = [], []
    for label, name in enumerate(class_dirs):
        found = matching(os.path.join(root, name))
        if not found:
            raise DataError(f"class folder {os.path.join(root, name)} has no {what} files")
        files += found
        labels += [label] * len(found)
    return files, labels, tuple(class_dirs)


def read_npy_header(path: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from a .npy header, checking that the file is exactly as long as the header says."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = os.fstat(f.fileno()).st_size
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise DataError(f"corrupt .npy file {path}: {e}") from None
    if actual != expected:
        raise DataError(f"corrupt .npy file {path}: {actual} bytes, its header implies {expected} (truncated?)")
    if fortran:
        # Both readers handle Fortran order, but it costs a transpose per sample: say so rather than be slow.
        raise DataError(f".npy file {path} is stored in Fortran order: "
                        "re-save it with np.save(path, np.ascontiguousarray(a))")
    return tuple(shape), dtype


def _index_npy(root: str) -> DatasetIndex:
    files, labels, classes = _scan(root, (".npy",), ".npy")
    shape, dtype = read_npy_header(files[0])
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise DataError(f".npy file {files[0]} has dtype {dtype}; samples must be float16/32/64 arrays")
    if len(shape) != 3:
        raise DataError(f".npy file {files[0]} has shape {shape}; samples must be (C, H, W) arrays")
    for path in files[1:]:
        s, d = read_npy_header(path)
        if s != shape or d != dtype:
            raise DataError(
                f".npy file {path} has shape {s} dtype {d}, but {files[0]} has shape {shape} dtype {dtype}: "
                "all samples must share one shape and dtype"
            )
    return DatasetIndex("npy", root, tuple(files), np.asarray(labels, np.int64), classes, shape, dtype)


def _index_latents(root: str) -> DatasetIndex:
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist or is not a folder (data.root)")
    m, shards, labels = open_latents(root)
    return DatasetIndex("latents", root, (), labels, m.classes, m.shape, m.dtype, latents=shards)


def _index_images(root: str, size: int) -> DatasetIndex:
    files, labels, classes = _scan(root, IMAGE_EXTENSIONS, "image (.png/.jpg/.jpeg)")
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise DataError(f"cannot read image file {path}: {e}") from None
        if not (head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC)):
            raise DataError(f"image file {path} is not a PNG or JPEG (bad signature {head[:4]!r})")
    labels = np.asarray(labels, np.int64)
    return DatasetIndex("images", root, tuple(files), labels, classes, (3, size, size), np.dtype(np.uint8))
