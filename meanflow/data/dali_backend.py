"""The DALI reader: one pipeline per epoch over this rank's files, listed in the contract's order.

Arrays go through fn.readers.numpy, images through fn.readers.file + fn.decoders.image (device "mixed", i.e. nvJPEG
on the GPU, when CUDA is available; "cpu" otherwise), fn.resize (shorter side, bilinear, antialiased,
subpixel_scale=False) and fn.crop_mirror_normalize (center crop, flip, (p - 127.5) / 127.5, CHW). Flip flags,
decided in Python from the epoch's rng, enter through fn.external_source, so DALI flips exactly the items the
fallback flips. Readers run with random_shuffle=False over an explicit `files=` list that already is this rank's
slice of the epoch from `start_step` on: no DALI sharding, nothing read that is not served. Labels are looked up in
Python from the same index rows.

Prepared latents go through fn.external_source (batch mode, two outputs) fed with the (mean, std) rows gathered from
the memory-mapped shards by the same code the torch fallback uses (latents.LatentShards.rows), rather than through
fn.readers.numpy with a per-sample ROI over the shard files: a row is 8-32 KB inside a shard of thousands, so the
work is the gather from the page cache (milliseconds a batch), which the numpy reader would do no faster while it
reopened a shard file per sample and needed per-sample ROI inputs for the row and the flip side; sharing the gather
makes both backends equal by construction. The sample itself (mean + std * eps) is formed by the Loader.

The file list changes every epoch and DALI readers cannot be re-pointed, so the pipeline is rebuilt per epoch; the
build is milliseconds (measured on 5000 files), negligible beside an epoch.
Outputs are CPU tensors, except images decoded on the GPU, which arrive as CUDA tensors on the current device.
"""

from __future__ import annotations

import numpy as np
import torch

from .index import DatasetIndex


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # a broken install (e.g. a CUDA mismatch) counts as absent for "auto"
        return False
    return True


class DaliReader:
    name = "dali"

    def __init__(self, index: DatasetIndex, scale: float, num_threads: int):
        self.index = index
        self.scale = float(scale)
        self.num_threads = max(1, num_threads)
        # GPU decoding needs the trainer to have selected this rank's device before building the loader.
        self.gpu = index.kind == "images" and torch.cuda.is_available()

    def _pipeline(self, files: list, flips: np.ndarray | None, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        def flip_of(info):  # per-sample source; wraps so that DALI's read-ahead past the last batch stays harmless
            return np.array(flips[info.idx_in_epoch % len(flips)], dtype=np.int32)

        @pipeline_def
        def npy_pipe():
            x = fn.readers.numpy(files=files, random_shuffle=False, name="reader")
            if self.index.dtype != np.float32:
                x = fn.cast(x, dtype=types.FLOAT)
            if flips is not None:
                x = fn.flip(fn.reshape(x, layout="CHW"), horizontal=fn.external_source(source=flip_of, batch=False))
            return x * self.scale if self.scale != 1 else x

        @pipeline_def
        def image_pipe():
            size = self.index.item_shape[-1]
            data, _ = fn.readers.file(files=files, random_shuffle=False, name="reader")
            x = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            x = fn.resize(x, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True, subpixel_scale=False)
            mirror = fn.external_source(source=flip_of, batch=False) if flips is not None else 0
            x = fn.crop_mirror_normalize(
                x, crop=(size, size), mirror=mirror, mean=127.5, std=127.5, dtype=types.FLOAT, output_layout="CHW"
            )
            return x * self.scale if self.scale != 1 else x

        @pipeline_def
        def latent_pipe():
            rows = self.index.latents.rows
            batches, fl = files.reshape(-1, batch_size), None if flips is None else flips.reshape(-1, batch_size)

            def batch_of(info):  # files: the item numbers here; a StopIteration past the last batch ends the epoch
                if info.iteration >= len(batches):
                    raise StopIteration
                return rows(batches[info.iteration], None if fl is None else fl[info.iteration])

            return tuple(fn.external_source(source=batch_of, num_outputs=2, batch=True, batch_info=True))

        pipes = {"npy": npy_pipe, "images": image_pipe, "latents": latent_pipe}
        pipe = pipes[self.index.kind](
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=torch.cuda.current_device() if self.gpu else None,
            prefetch_queue_depth=2,
        )
        pipe.build()
        return pipe

    def close(self):
        """Nothing to end: each epoch's pipeline (and its threads) goes with that epoch's generator."""

    def batches(self, idx: np.ndarray, flip: np.ndarray | None):
        """Yield (x, y) for each row of idx (S, B) ((mean, std, y) for prepared latents); flip (S, B) bool or None."""
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if idx.size == 0:
            return
        order = idx.reshape(-1)
        flips = None if flip is None else flip.reshape(-1)
        if self.index.kind == "latents":
            pipe = self._pipeline(order, flips, idx.shape[1])
            it = DALIGenericIterator(pipe, ["mean", "std"], auto_reset=False)
            for row, out in zip(idx, it):
                yield out[0]["mean"], out[0]["std"], torch.from_numpy(np.asarray(self.index.labels[row]))
            return
        files = [self.index.files[i] for i in order]
        pipe = self._pipeline(files, flips, idx.shape[1])
        it = DALIGenericIterator(pipe, ["x"], reader_name="reader", auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.DROP)
        for row, out in zip(idx, it):
            yield out[0]["x"], torch.from_numpy(self.index.labels[row])
