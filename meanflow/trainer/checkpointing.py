"""The `checkpoint.*` section and the trainer's checkpoint cadence: when to save, what goes with a checkpoint, and
resuming. The format itself (DCP, atomic rename, keep_last, checksums) lives in :mod:`meanflow.checkpoint`."""

import os
from dataclasses import dataclass

import torch

from meanflow.checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    checkpoint_root,
    complete_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    verify_checkpoint,
)


@dataclass
class CheckpointConfig:
    every: int = 5000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    verify: bool = True  # check every file's size and SHA-256 before resuming (~0.7 s per GB); false skips it

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
    """Load the newest checkpoint that verifies and loads, from path (the newest) down, into the trainer's model, EMA
    and optimizer; returns its step. One that fails is set aside (step_N.damaged-REASON, never deleted) with one
    warning line, and the next newest is tried; a CheckpointError names them all when none is left.

    Every rank takes the same decision: rank 0 alone reads and hashes the files (one read of the shared folder, not
    one per rank) and broadcasts its verdict, and a load counts as failed when it failed on any rank. A checkpoint
    whose files match their checksums but does not load is intact (another model or optimizer): it stays in place
    and the run stops."""
    d, verify = trainer.d, trainer.cfg.checkpoint.verify
    candidates = d.broadcast_object(_newest_first(trainer.run_dir, path) if d.is_main else None)
    damaged, warned = [], False
    for i, ckpt in enumerate(candidates):
        verdict, reason, detail = d.broadcast_object(_verdict(ckpt, verify) if d.is_main else None)
        if verdict == "unverified" and d.is_main and not warned:
            log.warning("checkpoint %s has no checksums (written before they were stored): it cannot be verified, "
                        "loading it as it is", ckpt)
            warned = True
        if verdict != "damaged":
            step, reason, detail = _load(trainer, ckpt, verdict, log)
            if step is not None:
                return step
        moved = _set_aside(d, ckpt, reason)
        damaged.append((ckpt, moved, reason))
        if d.is_main:
            log.warning("checkpoint %s is damaged (%s): %s; set aside as %s, %s", ckpt, reason, detail,
                        os.path.basename(moved), "trying the next newest" if i + 1 < len(candidates) else
                        "no older checkpoint is left")
    names = "; ".join(f"{ckpt} ({reason}, now {os.path.basename(moved)})" for ckpt, moved, reason in damaged)
    raise CheckpointError(f"no checkpoint in {checkpoint_root(trainer.run_dir)} loads, all set aside: {names}. A "
                          "rerun would start from step 0: rename one back to retry it")


def _newest_first(run_dir, path):
    found = [p for _, p in reversed(complete_checkpoints(run_dir))]
    return found[found.index(path):] if path in found else [path, *found]


def _verdict(path, verify):
    """(verdict, reason, detail) of rank 0's look at a checkpoint: picklable, for broadcast_object."""
    if not verify:
        return "skipped", None, None
    try:
        return ("verified" if verify_checkpoint(path) else "unverified"), None, None
    except CheckpointDamaged as e:
        return "damaged", e.reason, e.detail
    except OSError as e:  # a file vanished between looks, say: no rank may be left waiting for the verdict
        return "damaged", "read", str(e)


def _set_aside(d, path, reason):
    """Rename on rank 0, every rank leaving with the new name."""
    moved = []

    def rename():
        try:
            moved.append(set_aside(path, reason))
        except OSError as e:
            raise CheckpointError(f"checkpoint {path} is damaged ({reason}) and cannot be set aside: {e}") from None

    d.run_on_main(rename)
    return d.broadcast_object(moved[0] if moved else None)


def _load(trainer, ckpt, verdict, log):
    """(step, None, None) when ckpt loaded on every rank; (None, "load", why) when it failed to load without being
    verified; raises when a verified checkpoint fails (intact files: another model or optimizer)."""
    d, error = trainer.d, None
    try:
        meta = load_checkpoint(ckpt, trainer.model, trainer.ema.module, trainer.optimizer)
    except CheckpointError as e:
        error = e
    failed = d.all_reduce_mean(torch.tensor([float(error is not None)], device=d.device)).item() > 0
    if not failed:
        if d.is_main:
            log.info("resumed from %s (step %d, written by %d process(es))", ckpt, meta["step"], meta["world_size"])
        return int(meta["step"]), None, None
    if verdict == "verified":
        raise CheckpointError(f"{error or f'checkpoint {ckpt} failed to load on another rank'}; its files "
                              "match the checksums written at save, so it is left in place") from None
    return None, "load", (str(error).removeprefix(f"checkpoint {ckpt} ") if error else "failed to load on another rank")
