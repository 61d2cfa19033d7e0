"""Train MeanFlow.

    torchrun --standalone --nproc_per_node=N -m meanflow.train [--config NAME|FILE] [--section.key=value ...]
    python -m meanflow.train --config smoke                 # one process

With no arguments it trains the embedded default (preset ``mnist-demo``: a class-conditional DiT on 5000 real MNIST
digits) on whatever hardware is there. Presets: mnist-demo, smoke, imagenet-B2, imagenet-M2, imagenet-L2,
imagenet-XL2. Every config key can be overridden as --section.key=value (sections: model, data, objective, optim,
train, log, checkpoint), e.g. --train.steps=1000 --train.out=runs/mine --data.root=/data/latents.

Re-running the same command on an existing run folder resumes from its newest complete checkpoint. The run folder
holds config.json, metrics.jsonl, checkpoints/ and, at the end, samples.png (1-NFE samples of the EMA model, one row
per class) with the same samples as arrays in samples.npz.
"""

import json
import logging
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch

from meanflow.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    write_json_atomic,
)
from meanflow.config import ConfigError, config_from_dict, resolve_config
from meanflow.data import DataError, build_loader
from meanflow.distributed import init_distributed, shutdown
from meanflow.ema import EMA
from meanflow.images import save_samples
from meanflow.models import create_model
from meanflow.objective import draw, meanflow_loss
from meanflow.parallel import parallelize, precision_dtype, set_tf32
from meanflow.sampling import grid_classes, sample_grid

log = logging.getLogger("meanflow.train")


class RunFolderError(ValueError):
    """The run folder cannot be used for this config; nothing in it was changed."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


# ----------------------------------------------------------------------------------------------------------------------
# run folder
# ----------------------------------------------------------------------------------------------------------------------

def inspect_run_folder(run_dir, cfg):
    """Return the checkpoint to resume from (path) or None; raise RunFolderError if the folder is not ours or holds
    a different model. Reads only."""
    if not os.path.exists(run_dir):
        return None
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"train.out: {run_dir} exists and is not a folder")
    entries = os.listdir(run_dir)
    config_path = os.path.join(run_dir, "config.json")
    if not entries:
        return None
    if not os.path.isfile(config_path):
        raise RunFolderError(
            f"train.out: {run_dir} is not empty and holds no config.json, so it is not a meanflow run folder; "
            "choose another --train.out"
        )
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    saved = read_meta(latest[1]).get("config", {})
    try:
        saved_model = config_from_dict({"model": saved.get("model", {})}).model
    except ValueError as e:
        raise RunFolderError(f"checkpoint {latest[1]}: unreadable model config: {e}") from None
    if saved_model != cfg.model:
        raise RunFolderError(
            f"train.out: {run_dir} holds checkpoints of a different model ({saved_model}) than this config asks for "
            f"({cfg.model}); use another --train.out or the same model settings"
        )
    return latest[1]


def truncate_metrics(path, last_step):
    """Drop logged lines beyond the resumed step (they belong to the lost part of a crashed run)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= last_step:
                keep.append(ln)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# pieces of the step
# ----------------------------------------------------------------------------------------------------------------------

def build_optimizer(model, cfg, device):
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), fused=device.type == "cuda", **kwargs)


def step_seed(seed, step):
    """The generator seed of one step: its randomness depends only on (seed, step), never on the world size."""
    return (seed * 1_000_003 + step) % (2**63)


def lr_at(cfg, step):
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


# ----------------------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg, dist):
        self.cfg, self.d = cfg, dist
        self.run_dir = cfg.train.out
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")

    def setup(self):
        cfg, d = self.cfg, self.d
        if cfg.train.global_batch % d.world_size:
            raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not divisible by the world size "
                              f"{d.world_size}")
        self.loader = build_loader(cfg.data, cfg.train.global_batch, d.rank, d.world_size, cfg.train.seed)
        self._check_data_fits_model()
        resume = inspect_run_folder(self.run_dir, cfg)
        self.board = self._tensorboard() if d.is_main else None  # fails before anything is written

        # the same init on every rank (each shards its own full copy) and in every run of this seed
        torch.manual_seed(cfg.train.seed)
        model = create_model(cfg.model.name, **cfg.model.build_kwargs()).to(d.device)
        model.check_values = False  # r, t and y are built here; skip the per-call device syncs
        model.tangent_precision = cfg.train.tangent_precision
        self.ema = EMA.copy_of(model, cfg.optim.ema_decay, cfg.optim.ema_warmup)  # before sharding and compiling
        self.dtype = precision_dtype(cfg.train.precision, d.device)
        set_tf32(cfg.train.tf32)
        self.model = parallelize(model, distributed=d.initialized, compute_dtype=self.dtype,
                                 compile=cfg.train.compile, activation_checkpointing=cfg.train.activation_checkpointing)
        parallelize(self.ema.module, distributed=d.initialized, compute_dtype=torch.float32)
        self.optimizer = build_optimizer(self.model, cfg.optim, d.device)
        # without FSDP, bf16 comes from autocast; with FSDP, from its mixed-precision policy
        use_autocast = self.dtype != torch.float32 and not d.initialized
        self.autocast = torch.autocast(d.device.type, self.dtype) if use_autocast else nullcontext()

        self.step = 0
        if resume is not None:
            meta = load_checkpoint(resume, self.model, self.ema.module, self.optimizer)
            self.step = int(meta["step"])
            if d.is_main:
                log.info("resumed from %s (step %d, written by %d process(es))", resume, self.step, meta["world_size"])
        if d.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            truncate_metrics(self.metrics_path, self.step)
            write_json_atomic(os.path.join(self.run_dir, "config.json"), cfg.to_dict())
        d.barrier()
        self.resumed_at = self.step if resume is not None else None

    def _check_data_fits_model(self):
        cfg, ld = self.cfg, self.loader
        want = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        if cfg.model.name == "MLP":
            want = (cfg.model.in_channels,)
        if tuple(ld.item_shape) != want:
            raise ConfigError(f"data items have shape {tuple(ld.item_shape)} but model.in_channels/model.input_size "
                              f"give {want}")
        if cfg.model.num_classes > 0 and ld.num_classes == 0:
            raise ConfigError("model.num_classes > 0 but the data has no labels (set --model.num_classes=0)")
        if ld.num_classes > cfg.model.num_classes > 0:
            raise ConfigError(f"the data has {ld.num_classes} classes but model.num_classes is "
                              f"{cfg.model.num_classes}")
        if ld.steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch {cfg.train.global_batch} exceeds the {ld.num_items} items")

    # ------------------------------------------------------------------------------------------------------------------

    def train_step(self, x, y):
        cfg, d = self.cfg, self.d
        G, lb = cfg.train.global_batch, cfg.train.global_batch // d.world_size
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, self.step))
        rnd = draw(cfg.objective, G, tuple(x.shape[1:]), gen).rows(d.rank * lb, (d.rank + 1) * lb).to(d.device)
        with self.autocast:
            loss, stats = meanflow_loss(self.model, x, y, rnd, cfg.objective)
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)).float()
        loss_mean = d.all_reduce_mean(loss.detach().float())
        mse = d.all_reduce_mean(stats["mse"].float())
        finite = bool(torch.isfinite(loss_mean)) and bool(torch.isfinite(grad_norm))
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg.optim, self.step)
            self.optimizer.step()
            self.ema.update(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return finite, loss_mean.item(), mse.item(), grad_norm.item()

    def _tensorboard(self):
        if not self.cfg.log.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
        return lambda: SummaryWriter(os.path.join(self.run_dir, "tensorboard"))

    def save(self):
        meta = {"config": self.cfg.to_dict(), "epoch": self.step // self.loader.steps_per_epoch,
                "position": self.step % self.loader.steps_per_epoch,
                "rng": "per-step generators seeded by (train.seed, step): no state to restore"}
        save_checkpoint(self.d, self.run_dir, self.step, self.model, self.ema.module, self.optimizer, meta,
                        keep_last=self.cfg.checkpoint.keep_last)

    def run(self):
        self.setup()
        cfg, d = self.cfg, self.d
        total, spe = cfg.train.steps, self.loader.steps_per_epoch
        bar = None
        if d.is_main and cfg.log.progress:
            from tqdm import tqdm

            # redrawn at most twice a second (every few seconds when the output is a log file, not a terminal)
            interval = 0.5 if sys.stderr.isatty() else 5.0
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       mininterval=interval)
        metrics = open(self.metrics_path, "a") if d.is_main else None
        board = self.board() if self.board is not None else None
        bad, skipped = 0, 0
        window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
        batches = None
        try:
            while self.step < total:
                t_wait = time.perf_counter()
                if batches is None:
                    batches = self.loader.epoch(self.step // spe, self.step % spe)
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = None
                    continue
                window["wait"] += time.perf_counter() - t_wait
                x = x.to(d.device, non_blocking=True)
                y = y.to(d.device) if cfg.model.num_classes > 0 else None
                finite, loss, mse, gnorm = self.train_step(x, y)
                self.step += 1
                window["steps"] += 1
                if finite:
                    bad = 0
                else:
                    bad, skipped = bad + 1, skipped + 1
                    if d.is_main:
                        log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped",
                                    self.step, loss, gnorm)
                    if bad >= cfg.train.max_bad_steps:
                        raise TrainingDiverged(
                            f"training diverged: {bad} consecutive non-finite steps, the last at step {self.step}; "
                            f"the last good checkpoint is left untouched in {self.run_dir}/checkpoints "
                            "(lower optim.lr or raise optim.warmup_steps)"
                        )
                if self.step % cfg.log.every == 0 or self.step == total:
                    elapsed = time.perf_counter() - window["t0"]
                    row = {"step": self.step, "loss": loss, "mse": mse, "grad_norm": gnorm,
                           "lr": lr_at(cfg.optim, self.step - 1),
                           "img_per_s": window["steps"] * cfg.train.global_batch / max(elapsed, 1e-9),
                           "step_time_s": elapsed / max(window["steps"], 1),
                           "data_wait_frac": window["wait"] / max(elapsed, 1e-9),
                           "peak_mem_mib": peak_memory_mib(d.device), "skipped_steps": skipped}
                    if metrics is not None:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    if board is not None:
                        for key, value in row.items():
                            if key != "step":
                                board.add_scalar(f"train/{key}", value, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['img_per_s']:.0f}",
                                        step_s=f"{row['step_time_s']:.3f}", refresh=False)
                    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.checkpoint.every == 0 and self.step < total:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            if board is not None:
                board.close()
        if self.resumed_at != self.step:  # a finished run restarted has nothing new to save
            self.save()
        self.write_samples()

    def write_samples(self):
        cfg, d = self.cfg, self.d
        per_class = cfg.train.samples_at_end
        if per_class <= 0:
            return
        rows = max(1, len(grid_classes(cfg.model.num_classes)))
        x, _, rows = sample_grid(self.ema.module, rows * per_class, num_classes=cfg.model.num_classes,
                                 sample_shape=tuple(self.loader.item_shape), seed=cfg.train.seed, steps=1,
                                 device=d.device)
        if d.is_main:
            png = os.path.join(self.run_dir, "samples.png")
            save_samples(os.path.join(self.run_dir, "samples.npz"), x, rows)
            if x.dim() == 4:
                save_samples(png, x, rows)
                print(f"samples: {os.path.abspath(png)}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    d = None
    try:
        cfg = resolve_config(argv)
        d = init_distributed()
        if not d.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        Trainer(cfg, d).run()
    except (ConfigError, DataError, CheckpointError, RunFolderError, TrainingDiverged) as e:
        print(f"meanflow.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if d is not None:
            shutdown(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
