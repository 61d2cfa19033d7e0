"""Image grids, panels side by side with captions, and a dependency-free PNG writer (zlib + the three chunks a PNG
needs).

A grid of B images (H, W) in `rows` rows has cols = ceil(B / rows) columns and measures
(rows (H + pad) + pad) x (cols (W + pad) + pad) pixels, black between the images. panels() puts grids of the same
shape side by side, GAP white pixels apart, each under a CAPTION_H-pixel strip holding its caption in a built-in
5x7 pixel font (digits, space, '-' and the capitals of NFESTPOMGA: enough for "1-NFE", "STEP 250" and "OMEGA 4",
no font files).
"""

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


GAP = 8  # white pixels between two panels
CAPTION_H = 11  # a caption strip: 7-pixel glyphs with 2 pixels above and below
_GLYPHS = {  # 5x7, one string per row, "#" lit
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "-": (".....", ".....", ".....", ".###.", ".....", ".....", "....."),
    " ": (".....",) * 7,
}


def caption(text: str, width: int, channels: int) -> np.ndarray:
    """A (CAPTION_H, width, channels) black strip with `text` centred in white; left blank when the text is wider
    than the strip (a cut caption could misstate a step number)."""
    unknown = sorted(set(text) - set(_GLYPHS))
    if unknown:
        raise ValueError(f"caption: no glyph for {''.join(unknown)!r} (the font has {''.join(sorted(_GLYPHS))!r})")
    strip = np.zeros((CAPTION_H, width, channels), dtype=np.uint8)
    text_w = 6 * len(text) - 1  # 5 pixels a glyph, 1 between glyphs
    if not text or text_w > width - 2:
        return strip
    left = (width - text_w) // 2
    for i, char in enumerate(text):
        lit = np.array([[c == "#" for c in row] for row in _GLYPHS[char]])  # (7, 5)
        strip[2:9, left + 6 * i: left + 6 * i + 5][lit] = 255
    return strip


def panels(grids: list, captions: list) -> np.ndarray:
    """Grids (H, W, C) uint8 of one height side by side, GAP white pixels apart, each under its caption: one
    (CAPTION_H + H, n W + (n - 1) GAP, C) image."""
    if len(grids) != len(captions) or not grids:
        raise ValueError(f"panels: need one caption per grid, got {len(grids)} grids and {len(captions)} captions")
    if len({g.shape[0] for g in grids}) != 1 or len({g.shape[2] for g in grids}) != 1:
        raise ValueError(f"panels: the grids differ in height or channels: {[g.shape for g in grids]}")
    height, channels = CAPTION_H + grids[0].shape[0], grids[0].shape[2]
    columns = []
    for i, (grid, text) in enumerate(zip(grids, captions)):
        if i:
            columns.append(np.full((height, GAP, channels), 255, dtype=np.uint8))
        columns.append(np.concatenate([caption(text, grid.shape[1], channels), grid]))
    return np.concatenate(columns, axis=1)


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


def drawable(x: torch.Tensor) -> bool:
    """Whether samples (B, C, H, W) can be drawn as a grey (C = 1) or RGB (C = 3) image grid."""
    return x.dim() == 4 and x.shape[1] in (1, 3)


def save_arrays(path: str, **arrays):
    """An .npz of the given tensors or arrays (floating ones as float32, integers as they are), written atomically."""
    out = {}
    for key, value in arrays.items():
        if isinstance(value, torch.Tensor):  # through float32 first: numpy has no bfloat16
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        value = np.asarray(value)
        out[key] = value if value.dtype.kind in "iub" else value.astype(np.float32)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)


def save_samples(path: str, x: torch.Tensor, rows: int):
    """Save samples (B, C, H, W) in [-1, 1] as a PNG grid (.png) or raw arrays (.npz, key "samples")."""
    if path.endswith(".npz"):
        save_arrays(path, samples=x)
        return
    if x.dim() != 4:
        raise ValueError(f"cannot write samples of shape {tuple(x.shape)} as PNG (it needs images (B, C, H, W)): "
                         "use an .npz output")
    images = to_uint8(x)
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"cannot write {images.shape[-1]}-channel samples as PNG: use an .npz output")
    write_png(path, make_grid(images, rows))
