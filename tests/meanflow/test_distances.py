"""meanflow.distances: sliced Wasserstein-2 against closed forms (1-D Gaussians, a pure shift), the energy distance
against its definition written out, and both at their floor for two draws of one toy and far above it otherwise."""

import os

import numpy as np
import pytest
import torch

from meanflow.data.toy import TOYS, toy_points
from meanflow.distances import directions, energy_distance, sliced_wasserstein


@pytest.fixture
def rng():
    """Fresh random data per run; the seed is printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"distances seed={seed}")
    return np.random.default_rng(seed)


def test_sliced_wasserstein_of_1d_gaussians_is_the_closed_form(rng):
    # W2(N(m1, s1^2), N(m2, s2^2)) = sqrt((m1 - m2)^2 + (s1 - s2)^2); in 1-D SW2 is the exact empirical W2, whose
    # sampling error at n = 200000 is ~ sqrt(log log n / n) ~ 0.004
    m1, m2 = rng.uniform(-2, 2, 2)
    s1, s2 = rng.uniform(0.3, 2.0, 2)
    n = 200_000
    x, y = m1 + s1 * rng.standard_normal(n), m2 + s2 * rng.standard_normal(n)
    expected = np.hypot(m1 - m2, s1 - s2)
    assert sliced_wasserstein(x, y, projections=2) == pytest.approx(expected, abs=0.02)  # +1 and -1: exact in 1-D


@pytest.mark.parametrize("d", [2, 5])
def test_sliced_wasserstein_of_a_shift_is_exact(rng, d):
    # y = x + c, rows shuffled: each direction's W2 is |th . c|, whatever the order of the rows
    x = rng.standard_normal((777, d)) * rng.uniform(0.5, 2, d)
    c = rng.uniform(-1, 1, d)
    y = rng.permutation(x + c)
    th = directions(d, 300, seed=4)
    expected = np.sqrt(np.mean((th @ c) ** 2))
    assert sliced_wasserstein(x, y, projections=300, seed=4) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(torch.from_numpy(y).float(), x) == pytest.approx(sliced_wasserstein(y, x), rel=1e-6)


def test_directions_are_fixed_unit_vectors():
    th = directions(3, 64, seed=2)
    assert th.shape == (64, 3) and np.allclose(np.linalg.norm(th, axis=1), 1.0)
    np.testing.assert_array_equal(th, directions(3, 64, seed=2))
    assert not np.array_equal(th, directions(3, 64, seed=3))
    assert sorted(directions(1, 4, seed=0).ravel()) == [-1.0, -1.0, 1.0, 1.0]


def _energy_written_out(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| over all pairs, diagonals included (the V-statistic)."""
    def mean_dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).mean()

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def test_energy_distance_is_the_v_statistic(rng):
    x = rng.standard_normal((61, 3))
    y = rng.standard_normal((47, 3)) * 1.3 + 0.2
    expected = _energy_written_out(x, y)
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-12)
    assert energy_distance(x, y, chunk=7) == pytest.approx(expected, rel=1e-12)  # chunking changes nothing
    assert energy_distance(y, x) == pytest.approx(expected, rel=1e-12)
    a, b = rng.standard_normal(2)  # two point masses: 2 |a - b|
    assert energy_distance([[a]], [[b]]) == pytest.approx(2 * abs(a - b), rel=1e-12)


def test_energy_distance_is_nonnegative_and_zero_for_identical_samples(rng):
    for _ in range(20):  # two samples of one distribution: the case closest to 0
        x = rng.standard_normal((int(rng.integers(2, 40)), 2))
        y = rng.standard_normal((int(rng.integers(2, 40)), 2))
        assert energy_distance(x, y) >= 0
    x = rng.standard_normal((50, 2))
    assert energy_distance(x, x) == 0.0
    assert energy_distance(x, rng.permutation(x)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", list(TOYS))
def test_data_vs_data_sits_at_the_floor_far_below_other_data(rng, name):
    # floors of two 3000-point draws, over 12 seeds per toy: SW2 0.015-0.13 (8gaussians the highest: its cluster
    # counts differ between draws), energy 0.0002-0.006; a shift by (1, 1) gave >= 7x the highest SW2 floor and >= 100x
    # the highest energy floor, the other toy >= 12x and >= 275x: the thresholds below leave 2x and 5x of room
    n = 3000
    seeds = rng.integers(0, 2**31, 3)
    a, b = toy_points(name, n, seeds[0]), toy_points(name, n, seeds[1])
    other = toy_points("gaussian" if name != "gaussian" else "8gaussians", n, seeds[2])
    shifted = b + np.float32(1.0)
    for dist, far in ((sliced_wasserstein, 3), (energy_distance, 20)):
        floor = dist(a, b)
        assert 0 < floor < dist(a, shifted) / far, dist.__name__
        assert floor < dist(a, other) / far, dist.__name__


def test_bad_inputs_are_refused(rng):
    x = rng.standard_normal((10, 2))
    with pytest.raises(ValueError, match="equal shapes"):
        sliced_wasserstein(x, x[:9])
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(x, x[:, :1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        energy_distance(x, bad)
    with pytest.raises(ValueError, match="n > 0"):
        sliced_wasserstein(np.zeros((0, 2)), np.zeros((0, 2)))
