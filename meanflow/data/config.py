"""Data configuration (the `data.*` section of the trainer's config) and the one error type of the data package."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .toy import TOYS

SOURCES = ("mnist", "npy", "images", "toy", "latents")
LOADERS = ("auto", "dali", "torch", "memory")


class DataError(ValueError):
    """A problem with the data or its configuration; the message names the file, folder or config key at fault."""


@dataclass
class DataConfig:
    source: str = "mnist"  # "mnist" (5000 digits), "npy" (arrays), "images", "toy" (data.toy), "latents" (prepared)
    root: str = ""  # data folder for "npy"/"images"; for "mnist", where the cache goes (<root>/mnist5k)
    image_size: int = 32  # "images": shorter side resized to this, then center crop; "mnist": must be 32
    hflip: bool = False  # random horizontal flip, deterministic per (seed, epoch, item)
    scale: float = 1.0  # multiply every sample by this (e.g. 0.18215 for SD-VAE latents)
    loader: str = "auto"  # "dali", "torch", "memory" (npy, mnist: read into RAM once), "auto" (DALI, else torch)
    num_workers: int = 2  # torch DataLoader workers / DALI threads
    skip_nonfinite: bool = False  # items holding NaN/inf: false stops the run naming them; true skips their steps
    toy: str = "checkerboard"  # source "toy": "checkerboard", "8gaussians", "moons" or "gaussian" (data/toy.py)
    toy_points: int = 50_000  # source "toy": how many 2-D points make up the (fixed) training set
    toy_seed: int = 0  # source "toy": the seed the training set is drawn with (independent of train.seed)
    verify: bool = True  # prepared latents: check every shard's sha256 in one pass at start (split over the ranks)

    def validate(self) -> None:
        """Raise DataError naming the `data.*` key of the first bad value."""
        if self.source not in SOURCES:
            raise DataError(f"data.source: unknown value {self.source!r}; valid choices: {', '.join(SOURCES)}")
        if self.loader not in LOADERS:
            raise DataError(f"data.loader: unknown value {self.loader!r}; valid choices: {', '.join(LOADERS)}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise DataError(f"data.image_size: must be a positive integer, got {self.image_size!r}")
        if self.source == "mnist" and self.image_size != 32:
            raise DataError(f"data.image_size: the mnist source is 32x32 (28x28 padded), got {self.image_size}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale == 0:
            raise DataError(f"data.scale: must be a finite non-zero number, got {self.scale!r}")
        if not isinstance(self.verify, bool):
            raise DataError(f"data.verify: must be true or false, got {self.verify!r}")
        if self.source in ("npy", "images", "latents") and not self.root:
            raise DataError(f"data.root: the {self.source!r} source needs a data folder (set --data.root=DIR)")
        if self.source == "toy":
            self._validate_toy()

    def _validate_toy(self) -> None:
        if self.toy not in TOYS:
            raise DataError(f"data.toy: unknown distribution {self.toy!r}; valid choices: {', '.join(TOYS)}")
        if not isinstance(self.toy_points, int) or self.toy_points < 1:
            raise DataError(f"data.toy_points: must be a positive integer, got {self.toy_points!r}")
        if not isinstance(self.toy_seed, int) or self.toy_seed < 0:
            raise DataError(f"data.toy_seed: must be an integer >= 0, got {self.toy_seed!r}")
        if self.root:
            raise DataError(f"data.root: the toy source makes its points in memory and reads no folder; got "
                            f"{self.root!r} (unset data.root, or choose data.source npy/images)")
        if self.hflip:
            raise DataError("data.hflip: a flip of a 2-D point would swap its coordinates; the toy source has none")
        if self.loader == "dali":
            raise DataError("data.loader=dali: the toy source is served from memory (use data.loader=auto or torch)")


def infer_source(cfg: DataConfig) -> None:
    """A data.root given on the embedded-MNIST default means the user's own data: "latents" when the folder holds a
    prepared-latents manifest.json (docs/prepared-latents.md), else "npy" when it holds .npy files, "images" otherwise
    (set data.source to say which outright). The "npy" source recognises a prepared folder by itself (index.py), so
    the ImageNet presets' data.source "npy" is left as it is."""
    if cfg.source != "mnist":
        return
    if not os.path.isdir(cfg.root):
        raise DataError(f"data.root: data folder {cfg.root} does not exist")
    from .latent_manifest import is_prepared_latents

    if is_prepared_latents(cfg.root):
        cfg.source = "latents"
        return
    names = (n for _, _, files in os.walk(cfg.root) for n in files)
    cfg.source = "npy" if any(n.endswith(".npy") for n in names) else "images"
