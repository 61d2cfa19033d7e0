"""Image grids and a dependency-free PNG writer (zlib + the three chunks a PNG needs)."""

import os
import struct
import zlib

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, filled row by row."""
    B, H, W, C = images.shape
    cols = -(-B // rows)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = images[i]
    return grid


def write_png(path: str, image: np.ndarray):
    """Write an (H, W, 1|3) uint8 array as a grey or RGB PNG, atomically."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"write_png: need an (H, W, 1|3) uint8 array, got {image.dtype} {image.shape}")
    H, W, C = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(H))  # filter type 0 per scanline

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 0 if C == 1 else 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def save_samples(path: str, x: torch.Tensor, rows: int):
    """Save samples (B, C, H, W) in [-1, 1] as a PNG grid (.png) or raw arrays (.npz, key "samples")."""
    if path.endswith(".npz"):
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, samples=x.detach().float().cpu().numpy())
        os.replace(tmp, path)
        return
    if x.dim() != 4:
        raise ValueError(f"cannot write samples of shape {tuple(x.shape)} as PNG (it needs images (B, C, H, W)): "
                         "use an .npz output")
    images = to_uint8(x)
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"cannot write {images.shape[-1]}-channel samples as PNG: use an .npz output")
    write_png(path, make_grid(images, rows))
