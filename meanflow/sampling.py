"""Sampling with the average velocity: z_r = z_t - (t - r) u(z_t, r, t), from t = 1 (noise) to 0 (data).

One step (1-NFE) is x = e - u(e, 0, 1); n steps walk a decreasing time grid, 1 = t_0 > t_1 > ... > t_n = 0.
"""

import torch


def time_grid(steps: int, device=None, dtype=torch.float32):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample(model, noise, y=None, steps=1, grid=None):
    """Map noise (B, ...) to samples with ``steps`` evaluations of the model (or along ``grid``, decreasing 1 -> 0)."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError("noise must be a floating-point tensor")
    if grid is None:
        grid = time_grid(steps, noise.device, noise.dtype)
    else:
        grid = torch.as_tensor(grid, device=noise.device, dtype=noise.dtype)
        if grid.dim() != 1 or len(grid) < 2 or bool((grid[1:] >= grid[:-1]).any()):
            raise ValueError("grid must be a strictly decreasing 1-D sequence of times")
    B = noise.shape[0]
    z = noise
    for t, r in zip(grid[:-1], grid[1:]):
        u = model(z, r.expand(B), t.expand(B), y)
        z = z - (t - r) * u
    return z
