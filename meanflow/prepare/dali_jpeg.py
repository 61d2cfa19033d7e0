"""JPEG decoding with DALI (`fn.decoders.image`, device="mixed": nvJPEG on the GPU), for prepare when CUDA and DALI
are both there; PIL is used otherwise.

Only the decode moves to DALI: the ADM crop (BOX halvings, then PIL's antialiased BICUBIC) has no bit-equivalent in
DALI's resize, and latents must not depend on which machine made them beyond decoder rounding, so the decoded
HWC uint8 image comes back to the CPU and is cropped by the same PIL code as the PIL path. JPEG decoding is most of
the CPU cost per ImageNet image (~5 ms of ~8 ms), which is what this saves.

Untested here: the CPU machines have no GPU, and the GPU machines have no DALI. The same pipeline with device="cpu"
(DALI's CPU decoder) is what the tests run, so the plumbing (external source, variable batch, PIL fallback) is
covered; the "mixed" variant differs only in that word and the .as_cpu() copy. A batch DALI fails on (a corrupt
file) is decoded again file by file with PIL, which names the bad file.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import crop_batch, describe
from .listing import DECODE_ERRORS

JPEG_SUFFIXES = (".jpg", ".jpeg")


def dali_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliJpegDecoder:
    """decode(list of encoded JPEG byte arrays) -> list of HWC uint8 RGB arrays, or None when DALI fails the batch."""

    def __init__(self, max_batch: int, device: str = "mixed", device_id: int | None = 0, threads: int = 4):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=device_id if device == "mixed" else None,
                      prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device=device, output_type=types.RGB)

        self.device = device
        self.pipe = pipeline()
        self.pipe.build()

    def decode(self, blobs: list) -> list | None:
        try:
            self.pipe.feed_input("encoded", blobs)
            (out,) = self.pipe.run()
        except Exception:  # DALI raises RuntimeError for a corrupt file; the PIL fallback says which one
            return None
        if self.device == "mixed":
            out = out.as_cpu()
        return [np.array(out.at(j)) for j in range(len(blobs))]


class RawBytes(Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            return i, f.read()


def _pil_decode(blob: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except DECODE_ERRORS as e:
        return describe(e)


def dali_batches(files: list, batches: list, size: int, workers: int, device: str = "mixed", device_id: int = 0):
    """ImageBatch per entry of `batches`, like decode.pil_batches: files read by `workers` processes, JPEGs decoded
    by DALI, everything else (and any batch DALI rejects) by PIL, all cropped by PIL in a thread pool."""
    decoder = DaliJpegDecoder(max(len(b) for b in batches), device, device_id)
    raw = DataLoader(RawBytes(files), batch_sampler=batches, num_workers=workers, collate_fn=list,
                     prefetch_factor=4 if workers else None)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for items in raw:
            decoded = [None] * len(items)
            jpeg = [j for j, (i, _) in enumerate(items) if files[i].lower().endswith(JPEG_SUFFIXES)]
            if jpeg:
                out = decoder.decode([np.frombuffer(items[j][1], np.uint8) for j in jpeg])
                for j, arr in zip(jpeg, out or []):
                    decoded[j] = arr
            rest = [j for j in range(len(items)) if decoded[j] is None]
            for j, arr in zip(rest, pool.map(_pil_decode, [items[j][1] for j in rest])):
                decoded[j] = arr
            yield crop_batch([i for i, _ in items], decoded, size, pool)
