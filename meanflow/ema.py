"""Exponential moving average of the weights, kept in fp32 and sharded exactly like the model.

    ema <- decay * ema + (1 - decay) * w,     decay_k = min(decay, (1 + k) / (10 + k)) with warmup

The EMA is a second copy of the module (same structure, same FSDP sharding), so each rank averages only its own
shards, it checkpoints and reshards like the model, and sampling from it is a normal forward.
"""

import copy

import torch


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.module = module
        self.decay, self.warmup = decay, warmup
        self.module.requires_grad_(False)
        self.module.eval()

    @classmethod
    def copy_of(cls, model, decay, warmup=False):
        return cls(copy.deepcopy(model), decay, warmup)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        ema = [_local(p) for p in self.module.parameters()]
        new = [_local(p).detach().to(e.dtype) for p, e in zip(model.parameters(), ema)]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay_at(step))
