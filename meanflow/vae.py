"""The SD-VAE seam: load a diffusers AutoencoderKL, encode images to posterior moments, decode latents to pixels.

The VAE maps an RGB image x in [-1, 1]^(3, S, S) to a diagonal Gaussian posterior q(z | x) = N(mean, std^2) over
latents of shape (C, S/f, S/f), f = 2^(len(block_out_channels) - 1) (SD-VAE: C = 4, f = 8). Pixels map as
x = u8 / 127.5 - 1 on the way in and u8 = round(clamp((x + 1) * 127.5, 0, 255)) on the way out. Latents here are
**unscaled**: training multiplies by the scale factor (vae.config.scaling_factor, 0.18215 for SD-VAE) and decoding
divides by it first, both outside this module (docs/prepared-latents.md).

`diffusers` is the optional extra `.[vae]` and is imported only inside `load_vae`; the other functions take the loaded
module. Outputs stay on the VAE's device; inputs are moved there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

# A Hugging Face hub id ("owner/name" or "name"): anything else that is not an existing path is a missing local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class VAEError(ValueError):
    """The VAE cannot be loaded or used; the message names the argument (--vae by default) and the path."""


def load_vae(path_or_name: str, device="cpu", *, what: str = "--vae"):
    """diffusers.AutoencoderKL.from_pretrained(path_or_name) on `device`, eval mode, parameters without gradients.

    A local folder is used when it exists; otherwise a hub id is tried (it works only with network or a warm cache:
    nothing in this project downloads). `what` is the option name used in error messages.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError(f"{what}: loading a VAE needs diffusers, which is not installed: pip install -e .[vae] "
                       f"({e})") from e
    path_or_name = str(path_or_name)
    local = os.path.expanduser(path_or_name)
    if os.path.exists(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise VAEError(f"{what} {path_or_name}: not a diffusers AutoencoderKL folder (no config.json in it)")
        source = os.path.abspath(local)
    elif _HUB_ID.match(path_or_name):
        source = path_or_name
    else:
        raise VAEError(f"{what} {path_or_name}: no such file or folder")
    try:
        vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, hub errors...
        kind = "loading the folder" if os.path.exists(local) else "no such folder, and loading it as a hub name"
        raise VAEError(f"{what} {path_or_name}: {kind} failed: {type(e).__name__}: {e}") from e
    vae.eval().requires_grad_(False)
    return vae.to(torch.device(device))


def vae_identity(vae, path_or_name: str) -> dict:
    """{"path", "config_sha256"}: where the VAE came from (absolute for a local folder) and the sha256 of its config.

    The config is hashed as JSON with sorted keys, leaving out diffusers' bookkeeping keys (those starting with "_":
    the load path, the diffusers version, which defaults were used), so the same VAE moved or re-saved hashes alike.
    """
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=list)
    local = os.path.expanduser(str(path_or_name))
    path = os.path.abspath(local) if os.path.exists(local) else str(path_or_name)
    return {"path": path, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def downsampling_factor(vae) -> int:
    """f = 2^(number of encoder blocks - 1): the latent of an S x S image is S/f x S/f (8 for SD-VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, size: int) -> tuple[int, int, int]:
    """(C, size/f, size/f), the shape of one latent of a size x size image."""
    f = downsampling_factor(vae)
    if size % f:
        raise VAEError(f"image size {size} is not a multiple of the VAE's downsampling factor {f}")
    return (int(vae.config.latent_channels), size // f, size // f)


def _vae_device_dtype(vae) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_moments(vae, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of uint8 images (B, 3, S, S): float32 (B, C, S/f, S/f) each, on the VAE's device.

    x = u8 / 127.5 - 1; diffusers computes std = exp(0.5 * clamp(logvar, -30, 20)).
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise VAEError(f"encode_moments wants uint8 images (B, 3, S, S), got {images_uint8.dtype} "
                       f"{tuple(images_uint8.shape)}")
    latent_shape(vae, images_uint8.shape[-1])  # checks S against the downsampling factor
    device, dtype = _vae_device_dtype(vae)
    x = images_uint8.to(device).to(dtype) / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
    posterior = vae.encode(x).latent_dist
    return posterior.mean.float(), posterior.std.float()  # (B, C, S/f, S/f) each


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, f h, f w) on the VAE's device from unscaled latents z (B, C, h, w) (already divided by
    the scale factor): u8 = round(clamp((x + 1) * 127.5, 0, 255))."""
    if z.ndim != 4 or z.shape[1] != vae.config.latent_channels:
        raise VAEError(f"decode_latents wants latents (B, {vae.config.latent_channels}, h, w), got "
                       f"{tuple(z.shape)}")
    device, dtype = _vae_device_dtype(vae)
    x = vae.decode(z.to(device=device, dtype=dtype)).sample  # (B, 3, f h, f w), roughly [-1, 1]
    return ((x.float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
