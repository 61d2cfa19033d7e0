"""Distances between two point clouds x (n, d) and y (m, d), for judging samples of low-dimensional (toy) data.

All arithmetic is float64 on the CPU, whatever the inputs' dtype and device (numpy arrays or tensors).

Sliced Wasserstein-2 (equal sizes n = m):
    SW2(x, y) = sqrt( mean over L directions th of W2^2(th . x, th . y) ),
    W2^2(a, b) = (1/n) sum_i (a_(i) - b_(i))^2      (1-D: the optimal coupling pairs the sorted values)
with th drawn once from N(0, I_d) and normalised (`directions(d, L, seed)`: a fixed seed gives fixed directions, so
two calls compare alike). In 1-D the only directions are +-1, so SW2 is the exact empirical W2. For a pure shift
y = x + c every direction's W2 is |th . c|, so SW2 = sqrt(mean (th . c)^2) (~ |c| / sqrt(d) over many directions).
The squared SW2 is an average of squared W2's, so SW2 <= W2 of the full d-D problem.

Energy distance (Szekely and Rizzo), the V-statistic:
    E(x, y) = 2/(n m) sum_ij |x_i - y_j| - 1/n^2 sum_ij |x_i - x_j| - 1/m^2 sum_ij |y_i - y_j|
i.e. 2 E|X - Y| - E|X - X'| - E|Y - Y'| between the two *empirical* distributions (diagonal zeros included). It is
>= 0 always (|.| is conditionally negative definite), exactly 0 for x = y, and biased upwards by O(1/n) for two
samples of one distribution (the unbiased U-statistic, which drops the diagonals, can go negative). Compare a value
with the floor: the same distance between two independent draws of the data at the same n. The distance is not
square-rooted: it is a squared-distance-like quantity (twice the squared MMD of the distance kernel).
"""

from __future__ import annotations

import numpy as np
import torch


def _as_points(x, name: str) -> np.ndarray:
    """(n, d) float64; a 1-D input is n scalars."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or len(a) == 0:
        raise ValueError(f"{name}: expected points (n, d) with n > 0, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds NaN or inf")
    return a


def directions(d: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` unit vectors (count, d) float64, fixed by seed; in 1-D, +1 and -1 alternate."""
    if d == 1:
        return np.resize(np.array([[1.0], [-1.0]]), (count, 1))
    th = np.random.default_rng(seed).standard_normal((count, d))
    return th / np.linalg.norm(th, axis=1, keepdims=True)


def sliced_wasserstein(x, y, projections: int = 512, seed: int = 0) -> float:
    """SW2(x, y) over `projections` fixed directions (see the module docstring); x and y of equal size n."""
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got x {x.shape} and y {y.shape}")
    th = directions(x.shape[1], projections, seed)  # (L, d)
    px = np.sort(th @ x.T, axis=1)  # (L, n); numpy's sort is ~8x torch's on CPU here
    py = np.sort(th @ y.T, axis=1)  # (L, n)
    return float(np.sqrt(((px - py) ** 2).mean(1).mean()))


def _mean_distance(a: torch.Tensor, b: torch.Tensor, chunk: int) -> float:
    """(1 / (n m)) sum_ij |a_i - b_j|, a chunk of rows of a at a time (chunk x m distances in memory)."""
    total = 0.0
    for i in range(0, len(a), chunk):
        # the explicit-difference mode: the matmul form rounds |a - a| = 0 up to ~1e-8, a bias at small distances
        total += float(torch.cdist(a[i:i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist").sum())
    return total / (len(a) * len(b))


def energy_distance(x, y, chunk: int = 1024) -> float:
    """The V-statistic 2 E|X - Y| - E|X - X'| - E|Y - Y'| (see the module docstring); sizes may differ."""
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance: x has dimension {x.shape[1]}, y has {y.shape[1]}")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return 2 * _mean_distance(x, y, chunk) - _mean_distance(x, x, chunk) - _mean_distance(y, y, chunk)
