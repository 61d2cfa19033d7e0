"""The sampler (library): z_r = z_t - (t - r) u(z_t, r, t), from t = 1 (noise) to 0 (data). The command line that
loads a run and writes files is meanflow.sample (both names are fixed by the public contract).

One step (1-NFE) is x = e - u(e, 0, 1); n steps walk a decreasing time grid, 1 = t_0 > t_1 > ... > t_n = 0.

Improved MeanFlow models (``model.is_imf``) take their guidance at sampling: every call gets
cond = {omega, t_min, t_max} (the guidance scale and its interval, the same for every row), so
z_r = z_t - (t - r) u(z_t, r, t | y, omega, t_min, t_max). Without ``omega``/``interval`` the model's own defaults
apply (omega 1: no guidance, interval [0, 1]); other models have their guidance fixed in training and refuse both.
"""

import math

import torch


def check_guidance(omega=None, interval=None):
    """Validate a sampling guidance (omega >= 1, 0 <= t_min < t_max <= 1) or raise ValueError naming it."""
    if omega is not None and not (isinstance(omega, (int, float)) and math.isfinite(omega) and omega >= 1.0):
        raise ValueError(f"omega must be a number >= 1 (1 is no guidance), got {omega!r}")
    if interval is not None:
        if len(interval) != 2:
            raise ValueError(f"interval must be two times t_min, t_max, got {interval!r}")
        a, b = interval
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and 0.0 <= a < b <= 1.0):
            raise ValueError(f"interval must satisfy 0 <= t_min < t_max <= 1, got {a!r}, {b!r}")


def guidance_cond(model, batch, omega=None, interval=None, device=None, dtype=torch.float32):
    """The cond dict of an iMF model's call for a batch (None when neither is given); a ValueError for other models,
    whose guidance was fixed in training."""
    if omega is None and interval is None:
        return None
    if not getattr(model, "is_imf", False):
        given = "omega" if omega is not None else "interval"
        raise ValueError(f"{given}: guidance at sampling needs an Improved MeanFlow model (iMF-...); this "
                         f"{type(model).__name__} has its guidance fixed in training")
    check_guidance(omega, interval)
    t_min, t_max = (0.0, 1.0) if interval is None else interval
    values = {"omega": 1.0 if omega is None else omega, "t_min": t_min, "t_max": t_max}
    return {k: torch.full((batch,), float(x), device=device, dtype=dtype) for k, x in values.items()}


def default_guidance(objective_cfg) -> dict:
    """The sampling guidance a run's config stores: {omega, interval} for objective.kind "imf", else {}."""
    if getattr(objective_cfg, "kind", "meanflow") != "imf":
        return {}
    return {"omega": objective_cfg.imf_sample_omega,
            "interval": (objective_cfg.imf_sample_t_min, objective_cfg.imf_sample_t_max)}


def time_grid(steps: int, device=None, dtype=torch.float32):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample(model, noise, y=None, steps=1, grid=None, omega=None, interval=None):
    """Map noise (B, ...) to samples with ``steps`` evaluations of the model (or along ``grid``, decreasing 1 -> 0).

    omega, interval (t_min, t_max): an iMF model's guidance scale and interval (module docstring).
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError("noise must be a floating-point tensor")
    cond = guidance_cond(model, noise.shape[0], omega, interval, noise.device, noise.dtype)
    if grid is None:
        grid = time_grid(steps, noise.device, noise.dtype)
    else:
        grid = torch.as_tensor(grid, device=noise.device, dtype=noise.dtype)
        if grid.dim() != 1 or len(grid) < 2 or bool((grid[1:] >= grid[:-1]).any()):
            raise ValueError("grid must be a strictly decreasing 1-D sequence of times")
    B = noise.shape[0]
    extra = {} if cond is None else {"cond": cond}  # MeanFlow models take no cond
    z = noise
    for t, r in zip(grid[:-1], grid[1:]):
        u = model(z, r.expand(B), t.expand(B), y, **extra)
        z = z - (t - r) * u
    return z


def grid_classes(num_classes: int, max_rows: int = 10):
    """The classes shown as rows of a sample grid: all of them up to max_rows, else evenly spaced ones."""
    if num_classes <= 0:
        return []
    if num_classes <= max_rows:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / (max_rows - 1)) for i in range(max_rows)]


def sample_grid(model, n: int, *, num_classes: int, sample_shape, seed: int = 0, steps: int = 1, device="cpu",
                batch: int = 256, omega=None, interval=None):
    """n samples laid out one row per class (conditional) from seeded noise; returns (x, labels or None, rows).
    omega, interval: an iMF model's sampling guidance (see ``sample``).

    The same (n, seed) gives the same noise and labels on any machine and world size, so a grid can be reproduced
    from a checkpoint.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    classes = grid_classes(num_classes)
    noise = torch.randn(n, *sample_shape, generator=torch.Generator().manual_seed(seed))
    labels, rows = None, max(1, round(n**0.5))
    if classes:
        per_class = -(-n // len(classes))
        labels = torch.tensor(classes).repeat_interleave(per_class)[:n]
        rows = len(classes) if n % len(classes) == 0 else -(-n // per_class)
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, n, batch):
        y = None if labels is None else labels[i:i + batch].to(device)
        out.append(sample(model, noise[i:i + batch].to(device, dtype), y, steps=steps, omega=omega,
                          interval=interval).float().cpu())
    return torch.cat(out), labels, rows
