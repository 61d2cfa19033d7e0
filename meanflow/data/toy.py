"""2-D toy distributions for the MLP, generated in memory from a seed (data.source "toy", data.toy names one).

Every generator draws n points (n, 2) float64 from a numpy Generator; `toy_points` casts them to float32. Each is
scaled so that its per-axis standard deviation is about 1, the scale of the N(0, I) noise the flow starts from:

    checkerboard  FFJORD's (Grathwohl et al. 2019) 4x4 checker on [-4, 4]^2, then times sqrt(3)/4:
                      a ~ U[-2, 2),  b ~ U[0, 1) - 2 B,  B ~ Bernoulli(1/2),  b += floor(a) mod 2,
                      x = 2 (a, b) * sqrt(3)/4
                  so x is uniform on the 8 cells of side sqrt(3)/2 where floor(x1/c) + floor(x2/c) is even
                  (c = sqrt(3)/2); both marginals are U[-sqrt(3), sqrt(3)], standard deviation exactly 1.
    8gaussians    x = R (cos 2 pi k/8, sin 2 pi k/8) + s N(0, I),  k ~ U{0..7},  R = 2, s = 0.2
                  (FFJORD's ring has R = 2 sqrt(2), s = 0.5/sqrt(2); this one is smaller, per-axis std
                  sqrt(R^2/2 + s^2) = 1.43, and its adjacent centres are 2 R sin(pi/8) = 1.53 = 7.7 s apart).
    moons         sklearn's make_moons with random angles: th ~ U[0, pi], half B ~ Bernoulli(1/2),
                      upper (B = 0): (cos th, sin th),  lower (B = 1): (1 - cos th, 1/2 - sin th),
                  plus N(0, 0.05^2 I) noise, then centred on (1/2, 1/4) and times 1.5: per-axis std (1.30, 0.75).
    gaussian      x = m + s N(0, I),  m = (1.5, -1), s = 0.5 (the 1-NFE map x = m + s e is exact and linear).
"""

from __future__ import annotations

import math

import numpy as np

CHECKER_SCALE = math.sqrt(3) / 4  # U[-4, 4] has standard deviation 4 / sqrt(3)
CHECKER_CELL = 2 * CHECKER_SCALE  # side of one checker cell after scaling
RING_RADIUS, RING_STD = 2.0, 0.2
MOONS_NOISE, MOONS_CENTRE, MOONS_SCALE = 0.05, (0.5, 0.25), 1.5
GAUSSIAN_MEAN, GAUSSIAN_STD = (1.5, -1.0), 0.5


def checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.random(n) * 4 - 2
    b = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(a) % 2
    return np.stack([a, b], 1) * (2 * CHECKER_SCALE)  # (n, 2)


def ring_centres() -> np.ndarray:
    """The 8 centres (8, 2) of the 8gaussians distribution."""
    angle = 2 * np.pi * np.arange(8) / 8
    return RING_RADIUS * np.stack([np.cos(angle), np.sin(angle)], 1)


def eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    k = rng.integers(0, 8, n)
    return ring_centres()[k] + RING_STD * rng.standard_normal((n, 2))  # (n, 2)


def moons(rng: np.random.Generator, n: int) -> np.ndarray:
    th = rng.random(n) * np.pi
    lower = rng.random(n) < 0.5
    x = np.where(lower, 1 - np.cos(th), np.cos(th))
    y = np.where(lower, 0.5 - np.sin(th), np.sin(th))
    pts = np.stack([x, y], 1) + MOONS_NOISE * rng.standard_normal((n, 2))
    return (pts - np.asarray(MOONS_CENTRE)) * MOONS_SCALE  # (n, 2)


def gaussian(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.asarray(GAUSSIAN_MEAN) + GAUSSIAN_STD * rng.standard_normal((n, 2))  # (n, 2)


TOYS = {"checkerboard": checkerboard, "8gaussians": eight_gaussians, "moons": moons, "gaussian": gaussian}


def toy_points(name: str, n: int, seed) -> np.ndarray:
    """n points (n, 2) float32 of the toy `name`, fixed by `seed` (an int or a tuple of ints, numpy's SeedSequence
    entropy): the same (name, n, seed) gives the same points on any machine."""
    if name not in TOYS:
        raise ValueError(f"unknown toy distribution {name!r}; valid choices: {', '.join(TOYS)}")
    return TOYS[name](np.random.default_rng(seed), n).astype(np.float32)
