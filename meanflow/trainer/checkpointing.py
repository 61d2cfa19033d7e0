"""The `checkpoint.*` section and the trainer's checkpoint cadence: when to save, what goes with a checkpoint, and
resuming. The format itself (DCP, atomic rename, keep_last) lives in :mod:`meanflow.checkpoint`."""

from dataclasses import dataclass

from meanflow.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class CheckpointConfig:
    every: int = 5000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all

    def validate(self):
        if self.every <= 0:
            raise ValueError(f"checkpoint.every: must be > 0, got {self.every}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last: must be >= 0, got {self.keep_last}")


def due(cfg: CheckpointConfig, step: int, total: int) -> bool:
    """A periodic checkpoint after this step (the final one is written by the end of the run)."""
    return step % cfg.every == 0 and step < total


# Work a crash (or SIGKILL) may lose between checkpoints before the run warns; SIGTERM and SIGINT save first
# (meanflow.trainer.preemption), so this bounds only what they cannot catch.
LOSS_WARN_MINUTES = 30


def warn_about_cadence(cfg: CheckpointConfig, step_time_s: float, log):
    """One warning when checkpoint.every steps at the measured step time exceed LOSS_WARN_MINUTES."""
    minutes = cfg.every * step_time_s / 60
    if minutes > LOSS_WARN_MINUTES:
        log.warning("checkpoint.every=%d at %.3f s/step: a crash or SIGKILL can lose up to %.0f min of training "
                    "(SIGTERM and SIGINT save first); lower checkpoint.every to shorten that", cfg.every, step_time_s,
                    minutes)


def save(trainer):
    """Write the trainer's model, EMA and optimizer at its step, with the resolved config and the data position."""
    spe = trainer.loader.steps_per_epoch
    meta = {"config": trainer.cfg.to_dict(), "epoch": trainer.step // spe, "position": trainer.step % spe,
            "rng": "per-step generators seeded by (train.seed, step): no state to restore"}
    return save_checkpoint(trainer.d, trainer.run_dir, trainer.step, trainer.model, trainer.ema.module,
                           trainer.optimizer, meta, keep_last=trainer.cfg.checkpoint.keep_last)


def resume(path, trainer, log):
    """Load a checkpoint into the trainer's model, EMA and optimizer; returns its step."""
    meta = load_checkpoint(path, trainer.model, trainer.ema.module, trainer.optimizer)
    if trainer.d.is_main:
        log.info("resumed from %s (step %d, written by %d process(es))", path, meta["step"], meta["world_size"])
    return int(meta["step"])
