"""The 2-D toy source: each generator's shape, determinism and defining property; the loader over it keeps the
order contract (rank shards, (seed, epoch) order, resume); bad toy keys name themselves; a toy preset trains end to
end and meanflow.toy_eval measures it."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import meanflow.data as md
from meanflow.config import ConfigError
from meanflow.data import DataConfig, DataError, build_loader, toy
from meanflow.data.toy import TOYS, toy_points
from meanflow.toy_eval import evaluate_toy
from tests.meanflow.cli import cli_env, run


@pytest.fixture
def rng():
    """Fresh random seeds per run; printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"toy seed={seed}")
    return np.random.default_rng(seed)


def draw(name, n, rng):
    return toy_points(name, n, int(rng.integers(0, 2**31))).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TOYS))
def test_shape_dtype_and_determinism(rng, name):
    seed = int(rng.integers(0, 2**31))
    a = toy_points(name, 1001, seed)
    assert a.shape == (1001, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, toy_points(name, 1001, seed))
    assert not np.array_equal(a, toy_points(name, 1001, seed + 1))
    assert not np.array_equal(a, toy_points(name, 1001, (seed, 1)))


def test_checkerboard_fills_the_white_cells_evenly(rng):
    x = draw("checkerboard", 8000, rng)
    cell = np.floor(x / toy.CHECKER_CELL).astype(int)  # (n, 2), in -2..1
    assert (np.abs(x) <= 2 * toy.CHECKER_CELL).all()
    assert (cell.sum(1) % 2 == 0).all()  # every point in a white cell (floor(x1/c) + floor(x2/c) even)
    counts = np.unique(cell, axis=0, return_counts=True)[1]
    assert len(counts) == 8 and np.abs(counts - 1000).max() < 5 * np.sqrt(8000 / 8 * 7 / 8)
    np.testing.assert_allclose(x.std(0), 1.0, atol=0.05)  # U[-sqrt 3, sqrt 3]: std 1 exactly


def test_eight_gaussians_cluster_at_their_centres(rng):
    x = draw("8gaussians", 8000, rng)
    centres = toy.ring_centres()  # (8, 2)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), toy.RING_RADIUS)
    d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (n, 8)
    nearest = d2.argmin(1)
    counts = np.bincount(nearest, minlength=8)
    assert np.abs(counts - 1000).max() < 5 * np.sqrt(8000 / 8 * 7 / 8)
    resid = x - centres[nearest]  # N(0, s^2 I) about each centre: mean 0, std s per axis
    np.testing.assert_allclose(resid.mean(0), 0, atol=5 * toy.RING_STD / np.sqrt(8000))
    np.testing.assert_allclose(resid.std(0), toy.RING_STD, rtol=0.05)


def arc_distance(p, centre, upper):
    """Distance (n,) from points p (n, 2) to the upper (y >= centre's) or lower half of the unit circle at centre."""
    q = p - np.asarray(centre)
    on_side = q[:, 1] >= 0 if upper else q[:, 1] <= 0
    to_circle = np.abs(np.linalg.norm(q, axis=1) - 1)
    to_ends = np.minimum(np.linalg.norm(q - [1.0, 0.0], axis=1), np.linalg.norm(q + [1.0, 0.0], axis=1))
    return np.where(on_side, to_circle, to_ends)


def test_moons_lie_on_two_arcs_in_two_halves(rng):
    n = 8000
    x = draw("moons", n, rng) / toy.MOONS_SCALE + np.asarray(toy.MOONS_CENTRE)  # back to sklearn's coordinates
    upper = arc_distance(x, (0.0, 0.0), upper=True)  # (cos th, sin th)
    lower = arc_distance(x, (1.0, 0.5), upper=False)  # (1 - cos th, 1/2 - sin th)
    on_upper = upper < lower
    assert abs(on_upper.mean() - 0.5) < 5 * 0.5 / np.sqrt(n)  # the two halves, Bernoulli(1/2)
    gap = np.minimum(upper, lower)
    # on an arc up to the noise: its normal component has RMS MOONS_NOISE (less where an arc curves away)
    assert np.sqrt((gap**2).mean()) < 1.1 * toy.MOONS_NOISE
    assert x[on_upper, 1].mean() > 0.5 and x[~on_upper, 1].mean() < 0.0  # 2/pi and 1/2 - 2/pi


def test_gaussian_mean_and_std(rng):
    n = 20000
    x = draw("gaussian", n, rng)
    np.testing.assert_allclose(x.mean(0), toy.GAUSSIAN_MEAN, atol=5 * toy.GAUSSIAN_STD / np.sqrt(n))
    np.testing.assert_allclose(x.std(0), toy.GAUSSIAN_STD, rtol=0.03)
    assert abs(np.corrcoef(x.T)[0, 1]) < 5 / np.sqrt(n)


def test_unknown_toy_name():
    with pytest.raises(ValueError, match="valid choices: checkerboard, 8gaussians, moons, gaussian"):
        toy_points("spirals", 10, 0)


# ----------------------------------------------------------------------------------------------------------------------
# The loader over a toy source: the order contract of meanflow/data/order.py
# ----------------------------------------------------------------------------------------------------------------------
def toy_cfg(rng, **kw):
    return DataConfig(source="toy", toy=kw.pop("toy", "moons"), toy_points=kw.pop("toy_points", 26),
                      toy_seed=int(rng.integers(0, 2**31)), num_workers=0, **kw)


def collect(loader, epoch, start_step=0):
    batches = list(loader.epoch(epoch, start_step))
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (loader.local_batch, 2)
        assert y.dtype == torch.int64 and torch.equal(y, torch.zeros(loader.local_batch, dtype=torch.int64))
    return batches


def test_toy_loader_shards_by_rank_like_one_process(rng):
    cfg = toy_cfg(rng)  # 26 points, G = 6: 4 steps, tail of 2 dropped
    single = build_loader(cfg, 6, 0, 1, seed=9)
    assert (single.backend, single.num_items, single.item_shape, single.num_classes) == ("memory", 26, (2,), 0)
    points = single.index.points
    lookup = {row.tobytes(): i for i, row in enumerate(points)}
    assert len(lookup) == 26  # distinct points, so a row names its item
    perm, _ = md.epoch_order(26, 9, 2, False)
    one = collect(single, 2)
    for world in (2, 3):
        per_rank = [collect(build_loader(cfg, 6, r, world, seed=9), 2) for r in range(world)]
        ids = [[lookup[row.tobytes()] for x, _ in b for row in x.numpy()] for b in per_rank]
        assert all(len(i) == 4 * 6 // world for i in ids)
        assert sorted(sum(ids, [])) == sorted(perm[:24].tolist())  # disjoint, and together the epoch
        for s in range(4):  # each global batch = the ranks' batches concatenated = the 1-process batch
            x = torch.cat([per_rank[r][s][0] for r in range(world)])
            assert torch.equal(x, one[s][0])
            np.testing.assert_array_equal(x.numpy(), points[perm[s * 6 : (s + 1) * 6]])


def test_toy_loader_order_is_fixed_by_seed_and_epoch(rng):
    cfg = toy_cfg(rng, toy="checkerboard", toy_points=40)
    a, b = build_loader(cfg, 8, 0, 1, seed=3), build_loader(cfg, 8, 0, 1, seed=3)
    np.testing.assert_array_equal(a.index.points, b.index.points)  # the set: data.toy_seed alone
    for epoch in (0, 1):
        for (xa, _), (xb, _) in zip(collect(a, epoch), collect(b, epoch)):
            assert torch.equal(xa, xb)
    flat = lambda L, e: torch.cat([x for x, _ in collect(L, e)])  # noqa: E731
    assert not torch.equal(flat(a, 0), flat(a, 1))  # another epoch, another order
    other_seed = build_loader(cfg, 8, 0, 1, seed=4)
    np.testing.assert_array_equal(other_seed.index.points, a.index.points)  # train.seed moves the order only
    assert not torch.equal(flat(a, 0), flat(other_seed, 0))
    cfg2 = toy_cfg(rng, toy="checkerboard", toy_points=40)
    assert not np.array_equal(build_loader(cfg2, 8, 0, 1, seed=3).index.points, a.index.points)


def test_toy_loader_resumes_mid_epoch_and_scales(rng):
    cfg = toy_cfg(rng, toy="8gaussians", toy_points=30)
    L = build_loader(cfg, 4, 1, 2, seed=5)
    full = collect(L, 3)
    for start in (0, 2, 5, 7):
        tail = collect(L, 3, start_step=start)
        assert len(tail) == L.steps_per_epoch - start
        for (xa, _), (xb, _) in zip(tail, full[start:]):
            assert torch.equal(xa, xb)
    scale = float(rng.uniform(0.2, 3.0))
    cfg.scale = scale
    S = build_loader(cfg, 4, 1, 2, seed=5)
    for (xa, _), (xs, _) in zip(full, collect(S, 3)):
        torch.testing.assert_close(xs, xa * scale)
    assert "toy:8gaussians point 7" in L.describe(7)


@pytest.mark.parametrize("field,value,key", [
    ("toy", "spirals", "data.toy"),
    ("toy_points", 0, "data.toy_points"),
    ("toy_seed", -1, "data.toy_seed"),
    ("root", "/some/folder", "data.root"),
    ("hflip", True, "data.hflip"),
    ("loader", "dali", "data.loader"),
])
def test_bad_toy_keys_are_named(rng, field, value, key):
    cfg = toy_cfg(rng)
    setattr(cfg, field, value)
    with pytest.raises(DataError, match=key):
        build_loader(cfg, 2, 0, 1, 0)


def test_bad_toy_key_on_the_command_line_exits_2(tmp_path):
    p = run([sys.executable, "-m", "meanflow.train", "--config", "toy-moons", "--data.toy=spiral",
             f"--train.out={tmp_path / 'run'}"], cli_env(tmp_path / "cache"), check=False)
    assert p.returncode == 2 and "data.toy" in p.stderr and "spiral" in p.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------------
# A toy preset end to end, and its evaluation
# ----------------------------------------------------------------------------------------------------------------------
def test_toy_preset_trains_and_evaluates(tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "-m", "meanflow.train", "--config", "toy-gaussian", "--train.steps=30",
         "--checkpoint.every=15", f"--train.out={out}", "--log.every=10", "--log.progress=false"],
        cli_env(tmp_path / "cache"))
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["data"]["source"] == "toy" and saved["model"]["name"] == "MLP"
    with np.load(out / "samples.npz") as z:
        samples = z["samples"]
    assert samples.shape == (saved["train"]["samples_at_end"], 2) and np.isfinite(samples).all()

    r = evaluate_toy(str(out), steps=(1, 2, 100), n=300)
    expected = {f"{m}_{k}nfe" for m in ("swd", "energy") for k in (1, 2, 100)} | {"swd_floor", "energy_floor"}
    assert expected <= set(r) and r["n"] == 300 and r["step"] == 30 and r["toy"] == "gaussian"
    assert all(np.isfinite(r[k]) and r[k] > 0 for k in expected)
    # after 30 steps the samples are still near the N(0, I) noise, the data is at (1.5, -1) with std 0.5
    assert r["swd_1nfe"] > 3 * r["swd_floor"] and r["energy_1nfe"] > 3 * r["energy_floor"]
    assert evaluate_toy(str(out), steps=2, n=300, seed=r["seed"])["swd_2nfe"] == r["swd_2nfe"]  # reproducible
    with pytest.raises(ConfigError, match="--steps"):
        evaluate_toy(str(out), steps=(1, 0))

    # meanflow.evaluate on a toy run reports these distances (no FID), in its JSON file too
    from meanflow.evaluate import evaluate_run

    via_evaluate = evaluate_run(str(out), steps="1,2", n=300, seed=r["seed"], progress=False)
    assert via_evaluate["swd_2nfe"] == r["swd_2nfe"] and "fid_1nfe" not in via_evaluate
    with open(out / "eval_step_30.json") as f:
        assert json.load(f)["energy_1nfe"] == r["energy_1nfe"]
