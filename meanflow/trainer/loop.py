"""The `train.*` section and the Trainer: build the model stack, then loop over batches, logging and checkpointing.

    Trainer(cfg, dist).run()

setup() checks everything that can fail before the run folder is touched (the world size, the data against the
model, the run folder, the config against the checkpoint's (meanflow.trainer.config_change; False: the checkpoint
is at train.steps, nothing to do), TensorBoard), takes the run folder's lock (meanflow.trainer.run_lock), builds the
model, its EMA (fp32, sharded like the model), parallelism and the optimizer, resumes from the newest
complete checkpoint, and writes config.json and summary.json. run() trains to
train.steps, with a checkpoint every checkpoint.every steps and one at the end, a sample grid every log.sample_every
steps, loss.png at every checkpoint, and at the end samples.png (meanflow.trainer.pictures). Every step's randomness
comes from (train.seed, step) alone, so the world size, a resume and the pictures never change it.
"""

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from meanflow.checkpoint import checkpoint_root
from meanflow.data import DataError, build_loader
from meanflow.ema import EMA
from meanflow.errors import ConfigError
from meanflow.flops import config_step_flops, peak_flops_per_device
from meanflow.models import create_model
from meanflow.models.layers import TANGENT_PRECISIONS
from meanflow.objective import draw, meanflow_loss
from meanflow.parallel import parallelize, precision_dtype, set_tf32
from meanflow.trainer import checkpointing, config_change
from meanflow.trainer.metrics import MetricsLog, tensorboard_factory
from meanflow.trainer.optim import build_optimizer, lr_at, set_hyperparameters, set_lr
from meanflow.trainer.pictures import Pictures
from meanflow.trainer.preemption import Preempted, StopWatch
from meanflow.trainer.run_folder import inspect_run_folder, prepare_run_folder
from meanflow.trainer.run_lock import RunLock
from meanflow.trainer.summary import format_summary, run_summary

log = logging.getLogger("meanflow.train")
LOGGED_STATS = ("mse_v",)  # objective stats logged beside mse when present (objective_imf: the v-head's term)


@dataclass
class TrainConfig:
    steps: int = 400_000  # optimizer steps to train for (a resumed run continues to this total)
    global_batch: int = 256  # images per step over all processes
    out: str = "runs/default"  # the run folder; re-running on it resumes
    seed: int = 0  # model init, data order and every step's noise and times
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32" (README: Precision)
    tangent_precision: str = "fp32"  # the JVP tangent under bf16: "fp32", or "primal" (bf16 like the primal)
    tf32: bool = True  # fp32 matmuls and convolutions on CUDA in TF32 (torch and the attention kernel)
    compile: bool = False  # torch.compile each DiT block's forward and dual path
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after each forward (false: keep to backward)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    samples_at_end: int = 10  # samples per class in samples.png (1-NFE beside 2-NFE) written at the end (0: none)
    allow_config_change: bool = False  # resume even if train.global_batch/seed, objective.* or data.* changed

    def validate(self):
        if self.steps <= 0:
            raise ValueError(f"train.steps: must be > 0, got {self.steps}")
        if self.global_batch <= 0:
            raise ValueError(f"train.global_batch: must be > 0, got {self.global_batch}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision: unknown value {self.precision!r}; valid choices: auto, bf16, fp32")
        if self.tangent_precision not in TANGENT_PRECISIONS:
            raise ValueError(f"train.tangent_precision: unknown value {self.tangent_precision!r}; valid choices: "
                             f"{', '.join(TANGENT_PRECISIONS)}")
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        if not self.out:
            raise ValueError("train.out: the run folder must be set")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


def step_seed(seed, step):
    """The generator seed of one step: its randomness depends only on (seed, step), never on the world size."""
    return (seed * 1_000_003 + step) % (2**63)


def _full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


class Trainer:
    def __init__(self, cfg, dist):
        self.cfg, self.d = cfg, dist
        self.run_dir = cfg.train.out
        self.run_lock = RunLock(self.run_dir)  # one trainer per run folder, from setup to the end of run()
        self.bad_steps = self.skipped_steps = self.skipped_items = 0

    # ------------------------------------------------------------------------------------------------------------------
    # setup

    def setup(self):
        cfg, d = self.cfg, self.d
        if cfg.train.global_batch % d.world_size:
            raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not divisible by the world size "
                              f"{d.world_size}")
        self.loader = build_loader(cfg.data, cfg.train.global_batch, d.rank, d.world_size, cfg.train.seed)
        self._check_data_fits_model()
        self.pictures = Pictures(cfg, d, self.run_dir, self.loader.item_shape)
        self.pictures.check()
        resume, reference = inspect_run_folder(self.run_dir, cfg.model)
        self.tensorboard = tensorboard_factory(cfg.log, self.run_dir) if d.is_main else None
        if reference is not None and not config_change.review(*reference, cfg, d.is_main):
            return False  # the checkpoint is at or past train.steps
        d.run_on_main(self.run_lock.acquire)  # before rank 0 writes anything; a busy folder stops every rank
        self._build_model()
        self.step = checkpointing.resume(resume, self, log) if resume is not None else 0
        if resume is not None:  # the checkpoint's optimizer state brought its own lr, betas and weight decay
            set_hyperparameters(self.optimizer, cfg.optim, self.step, cfg.train.steps)
        self.resumed_at = self.step if resume is not None else None
        summary = run_summary(self)
        if d.is_main:
            log.info("%s", format_summary(summary))
        d.run_on_main(prepare_run_folder, self.run_dir, self.step, cfg.to_dict(), summary)
        self.pictures.collect_data(self.loader)  # before training reads the loader
        return True

    def _build_model(self):
        cfg, d = self.cfg, self.d
        torch.manual_seed(cfg.train.seed)  # the same init on every rank (each shards its own copy) and every run
        model = create_model(cfg.model.name, **cfg.model.build_kwargs()).to(d.device)
        model.check_values = False  # r, t and y are built here; skip the per-call device syncs
        model.tangent_precision = cfg.train.tangent_precision
        self.ema = EMA.copy_of(model, cfg.optim.ema_decay, cfg.optim.ema_warmup)  # before sharding and compiling
        self.dtype = precision_dtype(cfg.train.precision, d.device)
        set_tf32(cfg.train.tf32)
        self.model = parallelize(model, distributed=d.initialized, compute_dtype=self.dtype,
                                 compile=cfg.train.compile, activation_checkpointing=cfg.train.activation_checkpointing,
                                 reshard_after_forward=cfg.train.reshard_after_forward)
        parallelize(self.ema.module, distributed=d.initialized, compute_dtype=torch.float32)
        self.optimizer = build_optimizer(self.model, cfg.optim, d.device)
        # without FSDP, bf16 comes from autocast; with FSDP, from its mixed-precision policy
        use_autocast = self.dtype != torch.float32 and not d.initialized
        self.autocast = torch.autocast(d.device.type, self.dtype) if use_autocast else nullcontext()

    def _check_data_fits_model(self):
        cfg, ld = self.cfg, self.loader
        want = (cfg.model.in_channels,) if cfg.model.name == "MLP" else (
            cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
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
    # the loop

    def run(self):
        """Train; raises Preempted after saving when SIGTERM or SIGINT arrived (meanflow.trainer.preemption)."""
        with StopWatch() as stop:
            try:
                self._run(stop)
            finally:  # a DataLoader's persistent workers would otherwise outlive the trainer
                if hasattr(self, "loader"):
                    self.loader.close()
                self.run_lock.release()

    def _run(self, stop):
        if not self.setup():
            return
        cfg, d = self.cfg, self.d
        peak = peak_flops_per_device(d.device, self.dtype, cfg.train.tf32, cfg.log.peak_tflops)  # None: no MFU
        metrics = MetricsLog(cfg.log, self.run_dir, active=d.is_main, total=cfg.train.steps, start=self.step,
                             global_batch=cfg.train.global_batch, device=d.device, tensorboard=self.tensorboard,
                             step_flops=config_step_flops(cfg), world_size=d.world_size, peak_flops=peak)
        saved_at, saved = self.resumed_at, None  # a finished run restarted has nothing new to save
        with metrics:
            for x, y in self.batches(metrics):
                finite, loss, mse, grad_norm, extra = self.train_step(x, y)
                self.step += 1
                self._count_bad_steps(finite, loss, grad_norm, x)
                lr = lr_at(cfg.optim, self.step - 1, cfg.train.steps)
                logged = metrics.step_done(self.step, loss, mse, grad_norm, lr, self.skipped_steps, extra)
                if logged and metrics.lines == 2 and d.is_main:  # the first line's step time includes start-up
                    checkpointing.warn_about_cadence(cfg.checkpoint, metrics.last_step_time_s, log)
                self.pictures.at_step(self.ema.module, self.step)
                stopping = stop.agreed(d)  # every rank the same answer, so every rank saves the same step
                if stopping or checkpointing.due(cfg.checkpoint, self.step, cfg.train.steps):
                    if stopping and d.is_main:
                        log.info("%s: saving a checkpoint at step %d (a second signal exits at once, without one)",
                                 stop.signame, self.step)
                    start = time.perf_counter()
                    saved, saved_at = checkpointing.save(self), self.step
                    self.pictures.loss_curve()
                    if stopping:
                        raise Preempted(self.step, saved, stop.signame, time.perf_counter() - start)
        if saved_at != self.step:
            saved = checkpointing.save(self)
        self.pictures.loss_curve()
        if stop.agreed(d):  # a signal during the final save: the run is complete but for its samples
            raise Preempted(self.step, saved or checkpoint_root(self.run_dir), stop.signame)
        self.write_samples()

    def batches(self, metrics):
        """(x, y) on the device until train.steps, resuming mid-epoch; the wait for each batch goes to metrics."""
        spe, total, labels = self.loader.steps_per_epoch, self.cfg.train.steps, self.cfg.model.num_classes > 0
        while self.step < total:
            epoch = iter(self.loader.epoch(self.step // spe, self.step % spe))
            while self.step < total:
                start = time.perf_counter()
                batch = next(epoch, None)
                metrics.waited(time.perf_counter() - start)
                if batch is None:  # the epoch is done: the outer loop starts the next one
                    break
                x, y = batch
                yield x.to(self.d.device, non_blocking=True), (y.to(self.d.device) if labels else None)

    def _count_bad_steps(self, finite, loss, grad_norm, x):
        """After a step (self.step counts it): a non-finite step is blamed on its data when any rank's x holds
        NaN/inf (a DataError naming the files, or, with data.skip_nonfinite, a skipped step that does not count
        toward train.max_bad_steps), else on the optimisation (train.max_bad_steps in a row: TrainingDiverged)."""
        if finite:
            self.bad_steps = 0
            return
        bad_items = self._nonfinite_items(x, self.step - 1)
        if len(bad_items):
            names = ", ".join(self.loader.describe(i) for i in bad_items[:5])
            names += f" and {len(bad_items) - 5} more" if len(bad_items) > 5 else ""
            if not self.cfg.data.skip_nonfinite:
                raise DataError(f"step {self.step}: the data holds NaN or inf values in {names}: fix or remove "
                                f"{'it' if len(bad_items) == 1 else 'them'}, or set --data.skip_nonfinite=true to skip "
                                "the steps that read them")
            self.skipped_steps, self.skipped_items = self.skipped_steps + 1, self.skipped_items + len(bad_items)
            if self.d.is_main:
                log.warning("step %d: step skipped, its data holds NaN or inf values in %s (data.skip_nonfinite; "
                            "%d non-finite items skipped so far)", self.step, names, self.skipped_items)
            return
        self.bad_steps, self.skipped_steps = self.bad_steps + 1, self.skipped_steps + 1
        if self.d.is_main:
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped", self.step, loss,
                        grad_norm)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.bad_steps} consecutive non-finite steps, the last at step {self.step}; "
                f"the last good checkpoint is left untouched in {self.run_dir}/checkpoints; the data of these steps "
                "is finite, so the optimisation is unstable (lower optim.lr or raise optim.warmup_steps)"
            )

    def _nonfinite_items(self, x, step):
        """Item indices of the rows of global step `step` that hold NaN/inf, on every rank alike (one all-reduce of
        a flag per global row, so every rank takes the same decision and names the same files)."""
        G, lb, rank = self.cfg.train.global_batch, self.cfg.train.global_batch // self.d.world_size, self.d.rank
        flags = torch.zeros(G, device=x.device)  # (G,)
        flags[rank * lb : (rank + 1) * lb] = (~torch.isfinite(x.flatten(1)).all(dim=1)).float()  # (B,)
        flags = self.d.all_reduce_mean(flags)  # > 0 where some rank's row is bad
        spe = self.loader.steps_per_epoch
        items = self.loader.step_items(step // spe, step % spe)  # (G,)
        return items[(flags > 0).cpu().numpy()]

    def train_step(self, x, y):
        """One optimizer step on this rank's rows of the global batch; returns (finite, loss, mse, grad norm, extra),
        averaged over ranks, extra holding the iMF v-head's mse_v when the objective reports it ({} otherwise). A
        non-finite step changes no weights."""
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
        extra = {key: d.all_reduce_mean(stats[key].float()) for key in LOGGED_STATS if key in stats}
        finite = bool(torch.isfinite(loss_mean)) and bool(torch.isfinite(grad_norm))
        if finite:
            set_lr(self.optimizer, lr_at(cfg.optim, self.step, cfg.train.steps))
            self.optimizer.step()
            self.ema.update(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return finite, loss_mean.item(), mse.item(), grad_norm.item(), {k: v.item() for k, v in extra.items()}

    # ------------------------------------------------------------------------------------------------------------------
    # the end

    def write_samples(self):
        """samples.npz and samples.png: the EMA model's 1-NFE and 2-NFE samples (meanflow.trainer.pictures)."""
        self.pictures.at_end(self.ema.module)
