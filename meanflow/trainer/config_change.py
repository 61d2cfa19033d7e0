"""Resuming with a changed config: compare it with the checkpoint's saved config, say what differs, refuse what
would change the recipe the checkpoint was trained with.

    applied      logging, checkpoint cadence, precision, compile, train.steps, the lr schedule, grad clipping, the
                 EMA's decay, data.num_workers/loader/verify, train.out, objective.imf_sample_* (iMF's sampling
                 guidance): read afresh at every start
    optimizer    optim.lr, beta1, beta2, weight_decay: the checkpoint's optimizer state carries its own values, so
                 they are written into the param groups after loading (meanflow.trainer.optim.set_hyperparameters)
    recipe       everything else (train.global_batch, train.seed, objective.*, data.*): the resumed run would no
                 longer be the run the checkpoint belongs to; refused (ConfigError, exit 2) unless
                 --train.allow_config_change=true. model.* never gets here: meanflow.trainer.run_folder refuses it.

Keys present in only one of the two configs (a field added or removed since the checkpoint) are not compared.
"""

import logging

from meanflow.errors import ConfigError

log = logging.getLogger("meanflow.train")

APPLIED = {"optim.warmup_steps", "optim.schedule", "optim.final_lr_ratio", "optim.grad_clip", "optim.impl",
           "optim.ema_decay", "optim.ema_warmup",
           "train.steps", "train.precision", "train.tangent_precision", "train.tf32", "train.compile",
           "train.activation_checkpointing", "train.out", "train.samples_at_end", "train.max_bad_steps",
           "data.num_workers", "data.loader", "data.verify",
           # iMF's sampling guidance: read by the sample grids and as the CLIs' defaults, never by training
           "objective.imf_sample_omega", "objective.imf_sample_t_min", "objective.imf_sample_t_max"}
APPLIED_SECTIONS = {"log", "checkpoint"}
OPTIMIZER = {"optim.lr", "optim.beta1", "optim.beta2", "optim.weight_decay"}
NOT_COMPARED = {"train.allow_config_change"}  # about this start, not the run


def kind(key: str) -> str:
    """"applied", "optimizer" or "recipe" (anything not known to be safe)."""
    if key in OPTIMIZER:
        return "optimizer"
    if key in APPLIED or key.split(".")[0] in APPLIED_SECTIONS:
        return "applied"
    return "recipe"


def differences(saved: dict, current: dict) -> list:
    """[(section.key, saved value, current value)] for every key of both configs whose value differs."""
    found = []
    for section, values in current.items():
        old_values = saved.get(section)
        if not isinstance(values, dict) or not isinstance(old_values, dict):
            continue
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in NOT_COMPARED or name not in old_values:
                continue
            old = old_values[name]
            if old != value and not (isinstance(old, list) and tuple(old) == value):
                found.append((key, old, value))
    return found


def review(path, meta, cfg, is_main) -> bool:
    """Whether there is anything to train from the checkpoint at path, checking cfg against its saved config first.

    False when the checkpoint is already at or past train.steps (rank 0 says so in one line; the caller then writes
    nothing). Otherwise rank 0 logs one line per changed key, and a recipe change raises ConfigError listing them all
    unless cfg.train.allow_config_change. meta: the checkpoint's meta.json, as inspect_run_folder read it."""
    step = int(meta["step"])
    if cfg.train.steps <= step:
        if is_main:
            print(f"meanflow.train: train.steps={cfg.train.steps} is at or below step {step} of the checkpoint "
                  f"{path}: nothing to train, nothing written (raise --train.steps to continue)", flush=True)
        return False
    changes = differences(meta.get("config", {}), cfg.to_dict())
    recipe = [(k, old, new) for k, old, new in changes if kind(k) == "recipe"]
    if recipe and not cfg.train.allow_config_change:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in recipe)
        raise ConfigError(
            f"resuming {path} (step {step}) with a changed recipe: {listed}. These change what the run trains; use "
            "another --train.out, or --train.allow_config_change=true to continue with them anyway"
        )
    if is_main:
        notes = {"applied": "applied", "optimizer": "applied to the optimizer's param groups",
                 "recipe": "recipe change, allowed by train.allow_config_change"}
        for k, old, new in changes:
            log.info("config change since step %d: %s: %r -> %r (%s)", step, k, old, new, notes[kind(k)])
    return True
