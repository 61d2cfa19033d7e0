"""The `log.*` section and everything a run reports while it trains: metrics.jsonl, TensorBoard scalars and the
progress bar (rank 0 only), with the step timing they share. The pictures (samples/step_<step>.png every
log.sample_every steps, loss.png) are meanflow.trainer.pictures'.

Each metrics.jsonl line: step, loss, mse, mse_v (objective.kind "imf" only: the v-head's term; the progress bar
shows it too), grad_norm, lr, img_per_s (images per second over all ranks) and step_time_s (over the steps since the
last line), tflops_per_device (model TFLOP/s of one device: the step's FLOPs per image, meanflow.flops, times
img_per_s over the world size), mfu (that over the device's peak rate in the compute dtype; null where there is no
peak: on a CPU, or a GPU neither in meanflow.flops.PEAKS nor given by log.peak_tflops), data_wait_frac (share of the
time spent waiting for batches), peak_mem_mib, skipped_steps (non-finite steps so far).
"""

import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from meanflow.errors import ConfigError
from meanflow.flops import mfu
from meanflow.trainer.run_folder import METRICS

log = logging.getLogger("meanflow.train")


@dataclass
class LogConfig:
    every: int = 50  # steps between metrics.jsonl lines (and the progress bar's loss and speed)
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <train.out>/tensorboard
    sample_every: int = 0  # steps between <train.out>/samples/step_<step>.png (EMA, 1-NFE, 4 a class); 0: none
    peak_tflops: float = 0.0  # one device's peak TFLOP/s for MFU; 0: by device name from meanflow.flops.PEAKS

    def validate(self):
        if self.every <= 0:
            raise ValueError(f"log.every: must be > 0, got {self.every}")
        if self.sample_every < 0:
            raise ValueError(f"log.sample_every: must be >= 0 (0: no sample grids), got {self.sample_every}")
        if not self.peak_tflops >= 0:
            raise ValueError(f"log.peak_tflops: must be >= 0 (0: from the device's name), got {self.peak_tflops}")


def tensorboard_factory(cfg: LogConfig, run_dir):
    """A function that opens the run's SummaryWriter, or None; checked before the run folder is touched."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard: needs the tensorboard package (pip install tensorboard)") from None
    return lambda: SummaryWriter(os.path.join(run_dir, "tensorboard"))


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """Opened around the training loop (a context manager); a no-op on ranks other than 0."""

    def __init__(self, cfg: LogConfig, run_dir, *, active, total, start, global_batch, device, tensorboard=None,
                 step_flops=0.0, world_size=1, peak_flops=None):
        """step_flops: model FLOPs of a step per image; peak_flops: one device's peak FLOP/s, or None (no MFU)."""
        self.cfg, self.active, self.total, self.start = cfg, active, total, start
        self.global_batch, self.device, self._tensorboard = global_batch, device, tensorboard
        self.step_flops, self.world_size, self.peak_flops = step_flops, world_size, peak_flops
        self.path = os.path.join(run_dir, METRICS)
        self.file = self.board = self.bar = None
        self.lines, self.last_step_time_s = 0, None  # metrics lines written so far, and the latest one's step time
        self._window()

    def __enter__(self):
        if self.active and self.device.type == "cuda" and self.peak_flops is None:
            log.warning("mfu: no peak rate for %r in meanflow.flops.PEAKS, so MFU is not logged; give one device's "
                        "dense TFLOP/s in the compute dtype with --log.peak_tflops",
                        torch.cuda.get_device_name(self.device))
        if self.active:
            self.file = open(self.path, "a")
            self.board = self._tensorboard() if self._tensorboard is not None else None
            if self.cfg.progress:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm

                # redrawn at most twice a second (every few seconds when the output is a log file, not a terminal)
                self.bar = tqdm(total=self.total, initial=self.start, desc="train", unit="step", dynamic_ncols=True,
                                mininterval=0.5 if sys.stderr.isatty() else 5.0)
                # log lines (a skipped step, a save on a signal) above the bar rather than glued to its line
                self._logging = logging_redirect_tqdm()
                self._logging.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self._logging.__exit__(*exc)
        for handle in (self.bar, self.file, self.board):
            if handle is not None:
                handle.close()

    def _window(self):
        self.t0, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def waited(self, seconds):
        """Time spent waiting for a batch (reported as data_wait_frac)."""
        self.wait += seconds

    def step_done(self, step, loss, mse, grad_norm, lr, skipped, extra=None) -> bool:
        """Count a step; True when it wrote a metrics line. extra: more of the objective's stats ({name: float},
        e.g. iMF's mse_v), written after mse and shown on the progress bar."""
        self.steps += 1
        line = step % self.cfg.every == 0 or step == self.total
        if line:
            self._write(step, loss, mse, grad_norm, lr, skipped, extra or {})
        if self.bar is not None:
            self.bar.update(1)
        return line

    def _write(self, step, loss, mse, grad_norm, lr, skipped, extra):
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        img_per_s = self.steps * self.global_batch / elapsed
        row = {"step": step, "loss": loss, "mse": mse, **extra, "grad_norm": grad_norm, "lr": lr,
               "img_per_s": img_per_s,
               "step_time_s": elapsed / max(self.steps, 1),
               "tflops_per_device": self.step_flops * img_per_s / self.world_size / 1e12,
               "mfu": mfu(self.step_flops, img_per_s, self.world_size, self.peak_flops),
               "data_wait_frac": self.wait / elapsed, "peak_mem_mib": peak_memory_mib(self.device),
               "skipped_steps": skipped}
        self._window()
        self.lines, self.last_step_time_s = self.lines + 1, row["step_time_s"]
        if not self.active:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.board.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            speed = {"mfu": f"{row['mfu']:.1%}"} if row["mfu"] is not None else {}
            self.bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in extra.items()},
                                 img_s=f"{row['img_per_s']:.0f}",
                                 step_s=f"{row['step_time_s']:.3f}", **speed, refresh=False)
