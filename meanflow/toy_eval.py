"""Sample-vs-data distances of a 2-D toy run (data.source "toy"): its newest checkpoint's EMA model at 1, 2, ...
steps, against fresh draws of the run's distribution (meanflow.distances).

    from meanflow.toy_eval import evaluate_toy
    evaluate_toy("runs/toy-moons", steps=(1, 2, 100), n=5000)
    # {"swd_1nfe": ..., "energy_1nfe": ..., "swd_2nfe": ..., ..., "swd_floor": ..., "energy_floor": ...,
    #  "n": 5000, "step": 3000, "checkpoint": ".../step_00003000", "toy": "moons", "seed": 0}

Samples: n per step count from one seeded noise tensor (N(0, I) (n, 2), seed = `seed`, default the run's train.seed),
the same noise for every step count, so that 1-, 2- and 100-step results are paired draws; k steps walk the uniform
time grid 1 -> 0 of meanflow.sampling.sample (k = 100: average velocities over intervals of 0.01, close to 100 Euler
steps of the instantaneous velocity, the comparison with flow matching).
Data: 2n fresh points of data.toy drawn with the seed (data.toy_seed, seed, 1), times data.scale as the trainer
serves them: the first n are the reference every sample set is compared with, the last n give the floor,
swd_floor / energy_floor = the distance between two independent n-point draws of the data, i.e. what a perfect
model would score at this n. Both distances shrink with n (SW2 ~ 1/sqrt(n), energy ~ 1/n), so compare values only at
equal n. The draws are independent of the training set (seed data.toy_seed): this measures the distribution learnt.
"""

from __future__ import annotations

import numpy as np
import torch

from meanflow.checkpoint import CheckpointError
from meanflow.config import ConfigError
from meanflow.data.toy import toy_points
from meanflow.distances import energy_distance, sliced_wasserstein
from meanflow.sample import load_run
from meanflow.sampling import sample

PROJECTIONS = 512  # sliced Wasserstein directions (seed 0): within 1.5% of 8192 directions' SW2 on each toy (n 5000)


def evaluate_toy(run_dir, steps=(1, 2), n: int = 5000, seed=None, device="cpu", checkpoint=None,
                 verify: bool = True, batch: int = 8192) -> dict:
    """Distances of the run's EMA samples at each step count (an int or a sequence of ints) to the data, and the
    data-vs-data floor (see the module docstring). A run that is not a toy run, bad steps or n, or non-finite
    samples raise ConfigError or CheckpointError naming the problem; so does a damaged checkpoint (load_run)."""
    steps = [steps] if isinstance(steps, int) else list(steps)
    if not steps or any(not isinstance(k, int) or k < 1 for k in steps):
        raise ConfigError(f"--steps: step counts must be positive integers, got {steps!r}")
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"--n: must be an integer >= 2, got {n!r}")
    cfg, model, ckpt, step = load_run(run_dir, checkpoint, device, verify, prog="meanflow.evaluate")
    if cfg.data.source != "toy":
        raise ConfigError(f"--run: {run_dir} trained on data.source={cfg.data.source!r}, not a 2-D toy")
    seed = cfg.train.seed if seed is None else int(seed)
    data = toy_points(cfg.data.toy, 2 * n, (cfg.data.toy_seed, seed, 1)) * np.float32(cfg.data.scale)  # (2n, 2)
    ref, other = data[:n], data[n:]
    noise = torch.randn(n, *ref.shape[1:], generator=torch.Generator().manual_seed(seed))  # (n, 2)
    dtype = next(model.parameters()).dtype
    out = {}
    for k in steps:
        x = torch.cat([sample(model, noise[i:i + batch].to(device, dtype), None, steps=k).float().cpu()
                       for i in range(0, n, batch)])  # (n, 2)
        if not bool(torch.isfinite(x).all()):
            raise CheckpointError(f"checkpoint {ckpt} (step {step}): {k}-step samples hold NaN or inf values")
        out[f"swd_{k}nfe"] = sliced_wasserstein(x, ref, PROJECTIONS)
        out[f"energy_{k}nfe"] = energy_distance(x, ref)
    out["swd_floor"] = sliced_wasserstein(other, ref, PROJECTIONS)
    out["energy_floor"] = energy_distance(other, ref)
    out.update(n=n, step=step, checkpoint=ckpt, toy=cfg.data.toy, seed=seed)
    return out
