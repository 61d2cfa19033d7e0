"""Runs that train on prepared SD-VAE latents (docs/prepared-latents.md): recognising them, finding their VAE, and
turning their samples into images.

A run is a latent run when its data.root holds a `manifest.json` of format "meanflow-latents". Its samples are
scaled latents s z (s = data.scale, 0.18215 for SD-VAE); an image is decode(z) = decode(sample / s), through the VAE
the latents were made with: `--vae PATH` when given, else the manifest's vae.path. The decoder's uint8 output u8 is
handed on as u8 / 127.5 - 1 in [-1, 1], which meanflow.fid quantises back to the same u8 exactly.
"""

import json
import os
import sys

import torch

from meanflow.config import ConfigError
from meanflow.data.latent_manifest import FORMAT, MANIFEST


def latent_manifest(cfg) -> dict | None:
    """The manifest of the run's prepared latent folder (cfg.data.root), or None when the data is not one. Read as
    plain JSON: evaluation needs its vae and scale fields only, and must not open the shards that training's
    meanflow.data.latent_manifest.read_manifest checks."""
    root = cfg.data.root
    path = os.path.join(root, MANIFEST) if root else ""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.root {root}: its {MANIFEST} cannot be read ({e})") from None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_latent_run(cfg) -> bool:
    return latent_manifest(cfg) is not None


def vae_path(cfg, vae=None) -> str:
    """--vae when given (meanflow.vae.load_vae names it if it does not load), else the manifest's vae.path; a
    ConfigError naming --vae when neither is usable."""
    if vae:
        return vae
    manifest = latent_manifest(cfg)
    if manifest is None:
        why = f"data.root {cfg.data.root!r} holds no {FORMAT} {MANIFEST}"
    else:
        path = (manifest.get("vae") or {}).get("path")
        if path and os.path.exists(path):
            return path
        why = (f"the manifest's vae.path {path} does not exist here" if path else
               f"{os.path.join(cfg.data.root, MANIFEST)} names no vae.path")
    raise ConfigError(f"--vae: decoding needs the run's VAE, and {why}: pass --vae PATH (the diffusers "
                      "AutoencoderKL folder the latents were made with)")


class LatentDecoder:
    """Callable: scaled latents (B, C, h, w) -> images (B, 3, f h, f w) float32 in [-1, 1] on the CPU.

    decode(sample / data.scale) through meanflow.vae.decode_latents (uint8), mapped to u8 / 127.5 - 1. Build with
    LatentDecoder.for_run(cfg, vae, device); `uint8(x)` gives the decoder's uint8 images themselves.
    """

    def __init__(self, vae, scale: float, batch_size: int = 32, path=None):
        self.vae, self.scale, self.batch_size, self.path = vae, float(scale), int(batch_size), path

    @property
    def factor(self) -> int:
        """The VAE's downsampling factor f: an h x h latent decodes to an f h x f h image."""
        from meanflow.vae import downsampling_factor

        return downsampling_factor(self.vae)

    @classmethod
    def for_run(cls, cfg, vae=None, device="cpu", batch_size: int = 32, warn=None):
        from meanflow.vae import load_vae, vae_identity

        path = vae_path(cfg, vae)
        model = load_vae(path, device)
        manifest = latent_manifest(cfg)
        want = (manifest or {}).get("vae", {}).get("config_sha256")
        if want and vae_identity(model, path)["config_sha256"] != want:
            (warn or _stderr)(f"warning: the VAE {path} is not the one the latents were made with (its config hash "
                              f"differs from the manifest's {want[:12]}...): the images may be wrong")
        return cls(model, cfg.data.scale, batch_size, path)

    @torch.no_grad()
    def uint8(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 on the CPU, decoded batch_size latents at a time (the decoder's memory grows with B)."""
        from meanflow.vae import decode_latents

        out = [decode_latents(self.vae, x[i:i + self.batch_size].float() / self.scale).cpu()
               for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.uint8(x).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]


def _stderr(msg):
    print(f"meanflow: {msg}", file=sys.stderr, flush=True)
