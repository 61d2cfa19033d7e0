"""The sampling command line: draw samples from a run's newest checkpoint (EMA weights), in one process on any
machine. The sampler itself is the library function meanflow.sampling.sample.

    python -m meanflow.sample --run runs/mnist-demo [--steps 1] [--n 64] [--out samples.png|samples.npz]
                              [--seed 0] [--checkpoint DIR] [--device cpu|cuda] [--no-verify]
    python -m meanflow.sample --run runs/imagenet-XL2 --decode [--vae PATH] [--out DIR|grid.png|samples.npz]
    python -m meanflow.sample --run runs/mnist-imf [--omega 4] [--interval 0.2,0.8]      # an iMF run's guidance

--decode (runs on prepared latents, meanflow.latent_runs): the samples are latents; they are divided by the run's
data.scale and decoded through the VAE (--vae PATH, default the vae.path in the manifest of the run's data.root) to
RGB images, written as one PNG per sample into a folder (the default, RUN/samples_<steps>nfe/, files
<index>_class<label>.png, or <index>.png for an unconditional model), as a grid (--out FILE.png), or as ADM's sample
batch (--out FILE.npz: arr_0 uint8 (n, S, S, 3), arr_1 the labels), which guided-diffusion's evaluator reads; the
.npz holds meanflow.evaluate's class-balanced draws (the same seed gives the same samples), the others the grid's.

Conditional models lay the grid out one row per class (up to 10 classes, evenly spaced). The same --n and --seed
give the same noise and labels as the grid the trainer writes at the end (seed = train.seed, n = rows x
train.samples_at_end). The last line of standard output is a JSON object saying what was written. What can be
checked before sampling is (--device, the folder --out writes into, --seed >= 0), and samples holding NaN or inf are
refused rather than written: exit 2 with one line naming the checkpoint.

The checkpoint's files are checked against the sizes and SHA-256 sums stored at save (meanflow.checkpoint) first: a
damaged one is named with the next newest to pass as --checkpoint, and the command exits 2 without touching the run
folder (a trainer may be writing it; meanflow.train sets damaged checkpoints aside when it resumes).

--omega W and --interval T_MIN,T_MAX (Improved MeanFlow runs, objective.kind "imf"): the guidance scale (>= 1) and
the times where it applies (0 <= T_MIN < T_MAX <= 1), chosen freely at sampling; by default the run's
objective.imf_sample_omega / imf_sample_t_min / imf_sample_t_max (its preset's official 1-NFE setting). Other runs
have their guidance fixed in training and refuse both options.
"""

import argparse
import json
import os
import sys

import torch

from meanflow.checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_ema_weights,
    read_meta,
    verify_checkpoint,
)
from meanflow.config import ConfigError, config_from_dict
from meanflow.eval_draws import evaluation_draws
from meanflow.images import make_grid, save_arrays, save_samples, write_png
from meanflow.latent_runs import LatentDecoder
from meanflow.models import create_model
from meanflow.sampling import check_guidance, default_guidance, sample, sample_grid


def load_run(run_dir, checkpoint=None, device="cpu", verify=True, prog="meanflow.sample"):
    """(config, EMA model in eval mode, checkpoint path, step) of a run's newest (or the given) checkpoint, verified
    first unless verify is false; a damaged one is a CheckpointError naming it and the next newest."""
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--run: {run_dir} is not a folder")
    if checkpoint is None:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"--run: {run_dir} holds no complete checkpoint (checkpoints/step_*/meta.json)")
        checkpoint = latest[1]
    if verify:
        _verify(run_dir, checkpoint, prog)
    meta = read_meta(checkpoint)
    cfg = config_from_dict(meta["config"])
    model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    load_ema_weights(checkpoint, model)
    return cfg, model.to(device).eval(), checkpoint, int(meta["step"])


def _verify(run_dir, checkpoint, prog):
    try:
        verified = verify_checkpoint(checkpoint)
    except CheckpointDamaged as e:
        here = os.path.realpath(checkpoint)
        older = [p for _, p in complete_checkpoints(run_dir) if os.path.realpath(p) != here]
        hint = f"pass --checkpoint {older[-1]} (the newest other one)" if older else "the run holds no other checkpoint"
        raise CheckpointError(f"{e}; left in place: {hint}, or resume training (it sets damaged checkpoints "
                              "aside)") from None
    if not verified:
        print(f"{prog}: warning: checkpoint {checkpoint} has no checksums (written before they were stored): it "
              "cannot be verified", file=sys.stderr)


def check_device(text) -> torch.device:
    """--device as a torch.device this machine has, or a ConfigError saying why not (before any loading)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {text!r}; valid: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {text!r} is not supported; valid: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no usable GPU"
            raise ConfigError(f"--device: {text} asked for, but CUDA is not available ({build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device: {text} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_out_folder(out):
    """Before any sampling: the folder --out writes into exists and is writable."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {out}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the folder {folder} is not writable")


def _parser():
    p = argparse.ArgumentParser(prog="python -m meanflow.sample", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder written by meanflow.train")
    p.add_argument("--steps", type=int, default=1, help="number of model evaluations (1 = one-step)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default=None,
                   help="output .png (grid) or .npz (arrays); default RUN/samples_<steps>nfe.png")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's train.seed)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder instead of the newest one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's SHA-256 sums")
    p.add_argument("--decode", action="store_true", help="decode latent samples to RGB images through the run's VAE "
                   "(--out: a folder of PNGs (default RUN/samples_<steps>nfe/), a grid .png or an ADM .npz)")
    p.add_argument("--vae", default=None, help="with --decode: the VAE folder (default: the data manifest's vae.path)")
    add_guidance_options(p)
    return p


def add_guidance_options(p):
    """--omega and --interval, for meanflow.sample and meanflow.evaluate."""
    p.add_argument("--omega", type=float, default=None, help="iMF runs: guidance scale >= 1 (default: the run's "
                   "objective.imf_sample_omega)")
    p.add_argument("--interval", default=None, metavar="T_MIN,T_MAX", help="iMF runs: guidance interval, 0 <= T_MIN "
                   "< T_MAX <= 1 (default: the run's objective.imf_sample_t_min,imf_sample_t_max)")


def parse_interval(text):
    """'A,B' -> (A, B) floats, or a ConfigError naming --interval."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        interval = tuple(float(x) for x in parts)
    except ValueError:
        interval = ()
    if len(interval) != 2:
        raise ConfigError(f"--interval must be two times T_MIN,T_MAX (e.g. 0.4,0.65), got {text!r}")
    return interval


def check_guidance_args(omega, interval):
    """(omega, interval) of --omega/--interval (interval 'A,B' or a pair), checked before anything is loaded."""
    interval = parse_interval(interval) if isinstance(interval, str) else interval
    try:
        check_guidance(omega, interval)
    except ValueError as e:  # "omega must ..." / "interval must ...": name the option
        raise ConfigError(f"--{e}") from None
    return omega, interval


def run_guidance(cfg, model, omega, interval) -> dict:
    """The sampling guidance of a loaded run: the options over the run's stored defaults; a ConfigError when given
    for a model without guidance inputs."""
    if (omega is not None or interval is not None) and not getattr(model, "is_imf", False):
        given = "--omega" if omega is not None else "--interval"
        raise ConfigError(f"{given}: this run's {cfg.model.name} is not an Improved MeanFlow model (iMF-...): its "
                          "guidance was fixed in training; drop the option")
    guidance = default_guidance(cfg.objective) if getattr(model, "is_imf", False) else {}
    if omega is not None:
        guidance["omega"] = omega
    if interval is not None:
        guidance["interval"] = interval
    return guidance


def _check_args(args):
    """The output path and the device, checked before anything is loaded or sampled."""
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.vae is not None and not args.decode:
        raise ConfigError("--vae is used only with --decode")
    out = args.out or os.path.join(args.run, f"samples_{args.steps}nfe" + ("" if args.decode else ".png"))
    if not args.decode and not out.endswith((".png", ".npz")):
        raise ConfigError(f"--out must end in .png or .npz, got {out}")
    if args.decode and os.path.isfile(out) and not out.endswith((".png", ".npz")):
        raise ConfigError(f"--out {out}: with --decode, a folder for the PNGs, a .png grid or an .npz; this is a file")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    device = check_device(args.device)
    if args.out is not None or os.path.isdir(args.run):  # a missing --run is load_run's to name
        check_out_folder(out)
    return out, device


def _sample_shape(cfg, out, decode=False):
    shape = (cfg.model.in_channels,) if cfg.model.name == "MLP" else (
        cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    if decode and len(shape) != 3:
        raise ConfigError(f"--decode: this run's {cfg.model.name} makes vectors of {shape[0]} values, not latents")
    if not decode and out.endswith(".png") and (len(shape) != 3 or shape[0] not in (1, 3)):
        # before sampling: a grid of vectors or latents cannot be drawn, and nothing should be written
        made = f"vectors of {shape[0]} values" if len(shape) == 1 else f"{shape[0]}-channel arrays"
        hint = " or --decode (latents)" if len(shape) == 3 else ""
        raise ConfigError(f"--out {out}: PNG output needs 1- or 3-channel image data, but this run's "
                          f"{cfg.model.name} makes {made}; use --out FILE.npz{hint}")
    return shape


def balanced_samples(model, n, num_classes, shape, seed, steps, device, batch=256, **guidance):
    """(x, labels, rows) from meanflow.eval_draws' class-balanced draws (what meanflow.evaluate samples);
    guidance: an iMF model's omega / interval."""
    noise, labels = evaluation_draws(seed, n, shape, num_classes)
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, n, batch):
        y = None if labels is None else labels[i:i + batch].to(device)
        out.append(sample(model, noise[i:i + batch].to(device, dtype), y, steps=steps, **guidance).float().cpu())
    return torch.cat(out), labels, max(1, round(n ** 0.5))


def save_decoded(out, images, labels, rows) -> int:
    """Write decoded uint8 images (n, 3, S, S): a folder of PNGs, a grid .png, or ADM's sample .npz (arr_0
    (n, S, S, 3) uint8, arr_1 labels). Returns how many files were written."""
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (n, S, S, 3)
    if out.endswith(".npz"):
        arrays = {"arr_0": hwc} if labels is None else {"arr_0": hwc, "arr_1": labels}
        save_arrays(out, **arrays)
        return 1
    if out.endswith(".png"):
        write_png(out, make_grid(hwc, rows))
        return 1
    os.makedirs(out, exist_ok=True)
    for i in range(hwc.shape[0]):
        name = f"{i:06d}.png" if labels is None else f"{i:06d}_class{int(labels[i])}.png"
        write_png(os.path.join(out, name), hwc[i])
    return hwc.shape[0]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        out, device = _check_args(args)
        omega, interval = check_guidance_args(args.omega, args.interval)
        cfg, model, ckpt, step = load_run(args.run, args.checkpoint, device, not args.no_verify)
        guidance = run_guidance(cfg, model, omega, interval)
        seed = cfg.train.seed if args.seed is None else args.seed
        shape = _sample_shape(cfg, out, args.decode)
        decoder = LatentDecoder.for_run(cfg, args.vae, device) if args.decode else None  # before sampling
        if args.decode and out.endswith(".npz"):  # an FID sample batch: evaluate's class-balanced draws
            x, labels, rows = balanced_samples(model, args.n, cfg.model.num_classes, shape, seed, args.steps, device,
                                               **guidance)
        else:
            x, labels, rows = sample_grid(model, args.n, num_classes=cfg.model.num_classes, sample_shape=shape,
                                          seed=seed, steps=args.steps, device=device, **guidance)
        bad = int((~torch.isfinite(x.flatten(1)).all(dim=1)).sum())
        if bad:
            raise CheckpointError(f"checkpoint {ckpt} (step {step}): {bad} of {args.n} samples hold NaN or inf "
                                  "values (its EMA weights are not finite, or the model overflows): nothing written")
        extra = {k: list(v) if k == "interval" else v for k, v in guidance.items()}
        if decoder is None:
            save_samples(out, x, rows)
        else:
            images = decoder.uint8(x)  # (n, 3, S, S)
            extra.update(files=save_decoded(out, images, labels, rows), image_size=images.shape[-1],
                         vae=decoder.path)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"meanflow.sample: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": os.path.abspath(out), "n": args.n, "steps": args.steps, "checkpoint": ckpt,
                      "step": step, **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
