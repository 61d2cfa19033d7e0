"""The `optim.*` section: AdamW, its learning-rate schedule (linear warmup, then constant) and the EMA's decay."""

from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate after warmup
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2 (the paper's 0.95)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warmup of the learning rate over this many steps
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    impl: str = "auto"  # "auto" or "torch": torch's AdamW (fused on CUDA)
    ema_decay: float = 0.9999  # decay of the EMA weights that sampling and evaluation use
    ema_warmup: bool = False  # decay_k = min(ema_decay, (1 + k) / (10 + k)): useful for short runs

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"optim.beta1/beta2: must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        if self.impl not in ("auto", "torch"):
            raise ValueError(f"optim.impl: unknown value {self.impl!r}; valid choices: auto, torch")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")


def build_optimizer(model, cfg: OptimConfig, device):
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), fused=device.type == "cuda", **kwargs)


def lr_at(cfg: OptimConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warmup to cfg.lr, then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def set_hyperparameters(optimizer, cfg: OptimConfig, step: int):
    """Write the config's lr (at this step), betas and weight decay into every param group: loading an optimizer state
    restores the values it was saved with, which would otherwise silently win over a changed config."""
    for group in optimizer.param_groups:
        group["lr"], group["betas"], group["weight_decay"] = lr_at(cfg, step), (cfg.beta1, cfg.beta2), cfg.weight_decay


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
