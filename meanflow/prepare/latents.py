"""`python -m meanflow.prepare latents`: an image folder to SD-VAE latent shards (docs/prepared-latents.md).

    python -m meanflow.prepare latents --images /data/imagenet/train --out /data/in256-latents \\
        --vae /models/sd-vae-ft-ema [--size 256] [--batch 64] [--shard-size 4096] [--dtype float16]
    torchrun --standalone --nproc_per_node=8 -m meanflow.prepare latents --images ... --out ... --vae ...

For item i (image x_i, ADM-cropped to S x S) it stores the VAE posterior moments of x_i and of its mirror image:
mean[i] = (mu(x_i), mu(flip(x_i))), std[i] = (sigma(x_i), sigma(flip(x_i))), each (C, S/8, S/8). The flipped image
is encoded, not the latent flipped: the SD-VAE is not equivariant to flips, so flip(mu(x)) != mu(flip(x)).
One batch of N images is one encoder call on 2N images (each image and its mirror).

Shard s holds listing positions [s * shard_size, (s + 1) * shard_size), made by rank s % world_size; after every
rank is done, rank 0 writes labels.npy and manifest.json. Restarted on the same --out, a run skips the shards whose
done record's checksums verify, redoes the rest, and exits at once if the manifest is already there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from tqdm import tqdm

from meanflow.vae import VAEError, encode_moments, latent_shape, load_vae, vae_identity

from . import shards as disk
from .decode import pil_batches
from .listing import PrepareError, list_images, listing_sha256

DTYPES = {"float16": np.float16, "float32": np.float32}
# The keys that make two runs' shards interchangeable; a done record or manifest that differs in one is refused.
SETTING_OPTIONS = {"vae_config_sha256": "--vae", "image_size": "--size", "dtype": "--dtype",
                   "shard_size": "--shard-size", "listing_sha256": "--images"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meanflow.prepare latents",
                                description="Encode an image folder into SD-VAE latent shards with a manifest.")
    p.add_argument("--images", required=True, help="image folder: <class>/*.{png,jpg,jpeg} (labeled) or flat")
    p.add_argument("--out", required=True, help="output folder (created; resumed when it holds a partial run)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (or a hub name, if cached)")
    p.add_argument("--size", type=int, default=256, help="crop size S, a multiple of 8 (default 256)")
    p.add_argument("--batch", type=int, default=32, help="images per encoder call (each also encoded flipped)")
    p.add_argument("--shard-size", type=int, default=4096, help="listing positions per shard (default 4096)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored dtype (default float16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the VAE runs: auto = this rank's GPU when there is one")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding processes (default: 0 when encoding on the CPU, else min(8, CPUs per rank))")
    p.add_argument("--decoder", choices=("auto", "pil", "dali"), default="auto",
                   help="JPEG decoder: auto = DALI on the GPU when CUDA and DALI are there, else PIL")
    p.add_argument("--_test-slow-ms", dest="test_slow_ms", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def check_options(args):
    for option, value, low in (("--size", args.size, 8), ("--batch", args.batch, 1),
                               ("--shard-size", args.shard_size, 1), ("--workers", args.workers, 0)):
        if value is not None and value < low:
            raise PrepareError(f"{option} {value}: must be >= {low}")
    if args.size % 8:
        raise PrepareError(f"--size {args.size}: must be a multiple of 8 (the SD-VAE downsamples by 8)")
    images, out = os.path.abspath(args.images), os.path.abspath(args.out)
    if out == images or out.startswith(images + os.sep):
        raise PrepareError(f"--out {args.out} is inside --images {args.images}: the shards would become part of "
                           "the image folder; choose an output folder elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {args.out} exists and is not a folder")


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PrepareError("--device cuda: CUDA is not available on this machine")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setting_mismatch(found: dict, wanted: dict) -> str | None:
    """'--size (256 there, 128 now), ...' for the settings that differ, or None."""
    diffs = [f"{SETTING_OPTIONS[k]} ({k} {found.get(k)!r} there, {v!r} now)" for k, v in wanted.items()
             if found.get(k) != v]
    return ", ".join(diffs) or None


def manifest_settings(manifest: dict) -> dict:
    return {"vae_config_sha256": manifest.get("vae", {}).get("config_sha256"),
            "image_size": manifest.get("image_size"), "dtype": manifest.get("dtype"),
            "shard_size": manifest.get("shard_size"),
            "listing_sha256": manifest.get("images", {}).get("listing_sha256")}


def existing_manifest(out: str, settings: dict) -> dict | None:
    """The manifest of a complete run with these settings, None when there is none; a PrepareError otherwise."""
    path = os.path.join(out, disk.MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        manifest = disk.read_json(path)
    except (OSError, ValueError) as e:
        raise PrepareError(f"--out {out}: {disk.MANIFEST} is unreadable ({e}); not touching it") from None
    if manifest.get("format") != "meanflow-latents":
        raise PrepareError(f"--out {out}: {disk.MANIFEST} is not a meanflow-latents manifest; not touching it")
    diff = setting_mismatch(manifest_settings(manifest), settings)
    if diff:
        raise PrepareError(f"--out {out} holds a complete prepare run made with other settings: {diff}. "
                           "Use another --out (nothing was overwritten)")
    return manifest


def shards_to_do(out: str, my_shards: list, settings: dict, log) -> list:
    """This rank's shards without a trustworthy done record. A record from other settings is an error; one whose
    files do not verify is reported and its shard redone (its files are overwritten, they were ours)."""
    todo = []
    for s in my_shards:
        record = disk.read_done(out, s)
        if record is None:
            todo.append(s)
            continue
        diff = setting_mismatch(record.get("settings", {}), settings)
        if diff:
            raise PrepareError(f"--out {out}: shard {s} was made with other settings: {diff}. Use another --out "
                               "(nothing was overwritten)")
        problem = disk.done_record_problem(out, record)
        if problem:
            log(f"warning: shard {s}: {problem}; redoing it")
            os.remove(os.path.join(out, disk.SHARDS, disk.shard_file("done", s)))
            todo.append(s)
    return todo


class ShardBuffer:
    """The encoded rows of one shard until its last listing position is seen."""

    def __init__(self, index: int, first_image: int, num_images: int):
        self.index, self.first_image, self.num_images = index, first_image, num_images
        self.means, self.stds, self.labels, self.skipped, self.seen = [], [], [], [], 0

    def arrays(self, row_shape, dtype):
        empty = np.zeros((0, 2, *row_shape), dtype)
        return (np.concatenate(self.means) if self.means else empty, np.concatenate(self.stds) if self.stds else empty,
                np.asarray(self.labels, np.int64))


def encode_shards(vae, files, labels, todo, args, device, dtype, row_shape, settings, rank, log):
    """Encode this rank's pending shards, writing each (arrays, then done record) as soon as it is complete."""
    n, size = len(files), args.size
    bounds = {s: (s * args.shard_size, min((s + 1) * args.shard_size, n)) for s in todo}
    batches = [list(range(lo, min(lo + args.batch, bounds[s][1]))) for s in todo
               for lo in range(*bounds[s], args.batch)]  # never across a shard boundary
    if not batches:
        return 0
    workers = args.workers if args.workers is not None else (
        0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()))))
    use_dali = args.decoder == "dali" or (args.decoder == "auto" and device.type == "cuda" and _dali_available())
    if use_dali:
        from .dali_jpeg import dali_batches

        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise PrepareError("--decoder dali: nvidia-dali is not installed (pip install -e .[dali])") from None

        stream = dali_batches(files, batches, size, workers, "mixed" if device.type == "cuda" else "cpu",
                              device.index or 0)
    else:
        stream = pil_batches(files, batches, size, workers)
    total = sum(hi - lo for lo, hi in bounds.values())
    bar = tqdm(total=total, unit="img", desc=f"encode (rank {rank})", disable=rank != 0, dynamic_ncols=True)
    buffers, encoded, start = {}, 0, time.perf_counter()
    for batch in stream:
        s = batch.indices[0] // args.shard_size
        buf = buffers.setdefault(s, ShardBuffer(s, bounds[s][0], bounds[s][1] - bounds[s][0]))
        if batch.images is not None:
            k = len(batch.ok)
            both = torch.cat([batch.images, batch.images.flip(-1)])  # (2k, 3, S, S): each image, then its mirror
            mean, std = encode_moments(vae, both)  # (2k, C, h, w) each
            buf.means.append(torch.stack([mean[:k], mean[k:]], 1).cpu().numpy().astype(dtype))  # (k, 2, C, h, w)
            buf.stds.append(torch.stack([std[:k], std[k:]], 1).cpu().numpy().astype(dtype))
            buf.labels += [labels[i] for i in batch.ok]
        for i, error in batch.errors.items():
            bar.write(f"warning: skipping {files[i]}: {error}", file=sys.stderr)
            buf.skipped.append({"path": files[i], "error": error})
        buf.seen += len(batch.indices)
        encoded += len(batch.ok)
        bar.update(len(batch.indices))
        if args.test_slow_ms:
            time.sleep(args.test_slow_ms / 1000)
        if buf.seen == buf.num_images:
            mean_arr, std_arr, label_arr = buf.arrays(row_shape, dtype)
            disk.write_shard(args.out, s, buf.first_image, buf.num_images, mean_arr, std_arr, label_arr,
                             buf.skipped, settings)
            del buffers[s]
    bar.close()
    seconds = time.perf_counter() - start
    log(f"rank {rank}: encoded {encoded} images ({len(todo)} shards) in {seconds:.1f} s, "
        f"{encoded / max(seconds, 1e-9):.2f} images/s")
    assert not buffers, f"shards {sorted(buffers)} were not completed"
    return encoded


def _dali_available() -> bool:
    from .dali_jpeg import dali_available

    return dali_available()


def _long_barrier_group():
    """A gloo group whose barrier waits as long as the slowest rank's share takes (the default timeout is 10-30
    minutes; a resumed run's ranks can have very different amounts left)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(days=7))


def run(args) -> int:
    check_options(args)
    dist_state = None
    rank, world, local = 0, 1, 0
    if "WORLD_SIZE" in os.environ:
        from meanflow.distributed import init_distributed

        dist_state = init_distributed()
        rank, world, local = dist_state.rank, dist_state.world_size, dist_state.local_rank
        final_barrier = _long_barrier_group()  # made now, while the ranks are together

    def log(message):
        print(message, file=sys.stderr, flush=True)

    out = args.out = os.path.abspath(args.out)
    images_root = os.path.abspath(args.images)
    files, labels, classes = list_images(images_root)
    device = pick_device(args.device, local)
    vae = load_vae(args.vae, device)
    row_shape = latent_shape(vae, args.size)
    identity = vae_identity(vae, args.vae)
    settings = {"vae_config_sha256": identity["config_sha256"], "image_size": args.size, "dtype": args.dtype,
                "shard_size": args.shard_size, "listing_sha256": listing_sha256(images_root, files, labels)}
    manifest = existing_manifest(out, settings)
    if manifest is not None:
        if rank == 0:
            log(f"{out} is already complete ({manifest['count']} items, {manifest['skipped_count']} skipped); "
                "nothing to do")
        return 0
    os.makedirs(os.path.join(out, disk.SHARDS), exist_ok=True)
    num_shards = -(-len(files) // args.shard_size)
    todo = shards_to_do(out, list(range(rank, num_shards, world)), settings, log)
    if rank == 0:
        log(f"{len(files)} images in {len(classes) or 'no'} classes, {num_shards} shards of {args.shard_size}; "
            f"{world} rank(s); VAE on {device}; rank 0 has {len(todo)} shard(s) to encode")
    encode_shards(vae, files, labels, todo, args, device, DTYPES[args.dtype], row_shape, settings, rank, log)
    if dist_state is not None:
        import torch.distributed as dist

        dist.barrier(group=final_barrier)
    if rank != 0:
        return 0
    records = [disk.read_done(out, s) for s in range(num_shards)]
    missing = [s for s, r in enumerate(records) if r is None]
    if missing:
        raise PrepareError(f"shards {missing[:10]} have no done record after every rank finished (another process "
                           f"writing to --out {out}?)")
    for r in records:
        diff = setting_mismatch(r["settings"], settings)
        if diff:
            raise PrepareError(f"--out {out}: shard {r['shard']} was made with other settings: {diff}")
    header = {"shape": list(row_shape), "dtype": args.dtype, "image_size": args.size,
              "scale_factor": float(vae.config.scaling_factor), "vae": identity, "classes": classes,
              "shard_size": args.shard_size,
              "images": {"root": images_root, "listed": len(files), "listing_sha256": settings["listing_sha256"]}}
    manifest = disk.assemble_manifest(out, records, header)
    log(f"wrote {os.path.join(out, disk.MANIFEST)}: {manifest['count']} items, {manifest['skipped_count']} skipped")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (PrepareError, VAEError) as e:
        print(f"meanflow.prepare: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
