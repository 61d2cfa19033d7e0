"""`python -m meanflow.prepare latents` with a tiny random AutoencoderKL (2x downsampling) saved to a temporary folder
and 20 random PNGs in two classes plus one .png that does not decode (no network)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from meanflow.prepare.latents import main  # noqa: E402
from meanflow.prepare.listing import center_crop_arr, load_crop  # noqa: E402
from meanflow.vae import encode_moments, load_vae, vae_identity  # noqa: E402
from tests.meanflow.cli import REPO, cli_env  # noqa: E402
from tests.meanflow.test_vae import save_tiny_vae  # noqa: E402

SIZE, SHARD = 16, 4
BAD = os.path.join("a_cat", "05_broken.png")


def write_image_folder(folder, classes, per_class, smallest, largest, seed=0):
    """`per_class` PNGs of random pixels in folder/<class>/, each side drawn from [smallest, largest)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(folder / c)
        for i in range(per_class):
            h, w = rng.integers(smallest, largest, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / c / f"{i:02d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(images folder, vae folder): 10 PNGs of random sizes per class (some large enough for ADM's BOX halving),
    plus a text file named like a PNG in the first class."""
    root = tmp_path_factory.mktemp("prepare")
    write_image_folder(root / "images", ("a_cat", "b_dog"), 10, SIZE, 5 * SIZE)
    (root / "images" / BAD).write_bytes(b"this is not a PNG")
    return str(root / "images"), save_tiny_vae(root / "vae")


def prepare(images, vae, out, *extra):
    return main(["--images", images, "--out", str(out), "--vae", vae, "--size", str(SIZE), "--shard-size",
                 str(SHARD), "--batch", "3", *extra])


@pytest.fixture(scope="module")
def clean_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "latents"
    assert prepare(*data, out) == 0
    return out


def load_items(out):
    """(labels, mean, std) of every item, read through the manifest's shard table."""
    manifest = json.load(open(out / "manifest.json"))
    mean = np.concatenate([np.load(out / s["mean"], mmap_mode="r") for s in manifest["shards"]])
    std = np.concatenate([np.load(out / s["std"], mmap_mode="r") for s in manifest["shards"]])
    return np.load(out / "labels.npy"), mean, std


def assert_checksums_verify(out):
    manifest = json.load(open(out / "manifest.json"))

    def sha(rel):
        return hashlib.sha256((out / rel).read_bytes()).hexdigest()

    for s in manifest["shards"]:
        for kind in ("mean", "std", "labels"):
            assert sha(s[kind]) == s["sha256"][kind], s[kind]
    assert sha(manifest["labels"]["path"]) == manifest["labels"]["sha256"]


def test_layout_and_manifest(data, clean_run):
    images, vae_dir = data
    out = clean_run
    manifest = json.load(open(out / "manifest.json"))
    assert sorted(os.listdir(out)) == ["labels.npy", "manifest.json", "shards"]
    listed = 21  # 20 good + the broken one, which still takes its listing position: 6 shards of 4
    names = sorted(os.listdir(out / "shards"))
    assert names == sorted(f"{k}-{s:05d}.{'json' if k == 'done' else 'npy'}" for s in range(6)
                           for k in ("mean", "std", "labels", "done"))
    ident = vae_identity(load_vae(vae_dir), vae_dir)
    assert {k: manifest[k] for k in ("format", "version", "count", "shape", "dtype", "image_size", "scale_factor",
                                     "vae", "classes", "shard_size", "skipped_count")} == {
        "format": "meanflow-latents", "version": 1, "count": 20, "shape": [4, SIZE // 2, SIZE // 2],
        "dtype": "float16", "image_size": SIZE, "scale_factor": 0.18215, "vae": ident, "classes": ["a_cat", "b_dog"],
        "shard_size": SHARD, "skipped_count": 1}
    assert manifest["images"]["listed"] == listed
    bad = os.path.join(images, BAD)
    assert [s["path"] for s in manifest["skipped"]] == [bad] and "cannot identify" in manifest["skipped"][0]["error"]
    counts = [s["count"] for s in manifest["shards"]]
    assert counts == [4, 3, 4, 4, 4, 1]  # the broken file is listing position 6 (after 05.png), in shard 1
    assert [s["first"] for s in manifest["shards"]] == list(np.cumsum([0] + counts[:-1]))
    done = json.load(open(out / "shards" / "done-00001.json"))
    assert (done["shard"], done["first_image"], done["num_images"], done["count"]) == (1, 4, 4, 3)
    assert done["skipped"] == manifest["skipped"]
    assert_checksums_verify(out)

    labels, mean, std = load_items(out)
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 10 + [1] * 10
    for arr in (mean, std):
        assert arr.shape == (20, 2, 4, SIZE // 2, SIZE // 2) and arr.dtype == np.float16
    assert (std > 0).all()
    with open(out / "shards" / "mean-00000.npy", "rb") as f:
        assert f.read(8) == b"\x93NUMPY\x01\x00"  # .npy format 1.0, what DALI's numpy reader reads
    for s in manifest["shards"]:
        assert (np.load(out / s["labels"]) == labels[s["first"]:s["first"] + s["count"]]).all()


def test_flipped_latent_is_the_latent_of_the_flipped_image(data, tmp_path):
    images, vae_dir = data
    out = tmp_path / "f32"
    assert prepare(images, vae_dir, out, "--dtype", "float32") == 0
    _, mean, std = load_items(out)
    assert mean.dtype == np.float32
    vae = load_vae(vae_dir)
    files = [os.path.join(images, c, f) for c in ("a_cat", "b_dog") for f in sorted(os.listdir(os.path.join(images, c)))
             if os.path.join(c, f) != BAD]
    crops = torch.from_numpy(np.stack([load_crop(f, SIZE) for f in files])).permute(0, 3, 1, 2)  # (20, 3, S, S)
    m, s = encode_moments(vae, crops)
    mf, sf = encode_moments(vae, crops.flip(-1))
    np.testing.assert_allclose(mean[:, 0], m.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(mean[:, 1], mf.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(std[:, 1], sf.numpy(), atol=1e-5, rtol=1e-4)
    flipped_latent = mean[:, 0][..., ::-1]
    assert np.abs(mean[:, 1] - flipped_latent).max() > 0.05  # the mirror's latent is not the mirrored latent


def test_center_crop_is_adm(tmp_path):
    """640x400 at 100: two BOX halvings (400 -> 200 -> 100), no resize left, central columns 30..129 of 160.
    Each output pixel is the mean of a 4x4 block, checked against numpy."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (400, 640, 3), dtype=np.uint8)
    crop = center_crop_arr(Image.fromarray(pixels), 100)
    half = (pixels.reshape(200, 2, 320, 2, 3).astype(float).mean((1, 3)) + 0.5).astype(np.uint8)
    quarter = (half.reshape(100, 2, 160, 2, 3).astype(float).mean((1, 3)) + 0.5).astype(np.uint8)
    assert crop.shape == (100, 100, 3) and crop.dtype == np.uint8
    # PIL's fixed-point BOX rounds a little differently: within 2 levels at the right offset, far off at its neighbour
    assert np.abs(crop.astype(int) - quarter[:, 30:130].astype(int)).max() <= 2
    assert np.abs(crop.astype(int) - quarter[:, 31:131].astype(int)).mean() > 10
    assert center_crop_arr(Image.fromarray(pixels[:30, :50]), 16).shape == (16, 16, 3)  # BICUBIC up/down path


def test_rerun_on_complete_folder_and_other_settings(data, clean_run, capsys):
    stamp = os.path.getmtime(clean_run / "manifest.json")
    assert prepare(*data, clean_run) == 0
    assert "already complete" in capsys.readouterr().err
    for extra, named in ((["--dtype", "float32"], "--dtype"), (["--shard-size", "5"], "--shard-size")):
        args = ["--images", data[0], "--out", str(clean_run), "--vae", data[1], "--size", str(SIZE), "--batch", "3"]
        args += ["--shard-size", str(SHARD)] if "--shard-size" not in extra else []
        assert main(args + extra) == 2
        assert named in capsys.readouterr().err
    assert os.path.getmtime(clean_run / "manifest.json") == stamp


def test_killed_and_restarted_matches_a_clean_run(data, clean_run, tmp_path, capsys):
    """A real SIGKILL after the first done record, a corrupted finished shard, then a restart: every item's label and
    moments equal the uninterrupted run's, and the checksums verify."""
    images, vae_dir = data
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "meanflow.prepare", "latents", "--images", images, "--out", str(out), "--vae", vae_dir,
           "--size", str(SIZE), "--shard-size", str(SHARD), "--batch", "3", "--_test-slow-ms", "400"]
    proc = subprocess.Popen(cmd, env=cli_env(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "shards" / "done-00000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no shard finished within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.stderr.close()
    done = [n for n in os.listdir(out / "shards") if n.startswith("done-")]
    assert not (out / "manifest.json").exists() and 1 <= len(done) < 6, done  # really killed halfway
    corrupt = out / "shards" / "mean-00000.npy"
    corrupt.write_bytes(corrupt.read_bytes()[:-2] + b"\x00\x00")  # a finished shard whose file no longer verifies

    capsys.readouterr()
    assert prepare(images, vae_dir, out) == 0
    err = capsys.readouterr().err
    assert "shard 0: mean-00000.npy does not match its sha256; redoing it" in err
    assert f"rank 0 has {6 - len(done) + 1} shard(s) to encode" in err  # the other finished shards are kept
    labels, mean, std = load_items(out)
    ref_labels, ref_mean, ref_std = load_items(clean_run)
    assert labels.tolist() == ref_labels.tolist()
    np.testing.assert_allclose(mean.astype(np.float32), ref_mean.astype(np.float32), atol=2e-3, rtol=0)
    np.testing.assert_allclose(std.astype(np.float32), ref_std.astype(np.float32), atol=2e-3, rtol=0)
    manifest, ref = (json.load(open(o / "manifest.json")) for o in (out, clean_run))
    assert [(s["first"], s["count"]) for s in manifest["shards"]] == [(s["first"], s["count"]) for s in ref["shards"]]
    assert manifest["skipped"] == ref["skipped"]
    assert_checksums_verify(out)


@pytest.mark.parametrize("case", ["missing_images", "empty_images", "size", "missing_vae", "not_a_vae",
                                  "no_diffusers", "out_inside_images"])
def test_bad_input_is_named(case, data, tmp_path, capsys, monkeypatch):
    images, vae_dir = data
    args = {"--images": images, "--out": str(tmp_path / "out"), "--vae": vae_dir, "--size": str(SIZE)}
    named = {"missing_images": "--images", "empty_images": "--images", "size": "--size", "missing_vae": "--vae",
             "not_a_vae": "--vae", "no_diffusers": "pip install -e .[vae]", "out_inside_images": "--out"}[case]
    if case == "missing_images":
        args["--images"] = str(tmp_path / "nowhere")
    elif case == "empty_images":
        os.makedirs(tmp_path / "empty" / "class0")
        args["--images"] = str(tmp_path / "empty")
    elif case == "size":
        args["--size"] = "20"
    elif case == "missing_vae":
        args["--vae"] = str(tmp_path / "no_vae_here")
    elif case == "not_a_vae":
        args["--vae"] = images
    elif case == "no_diffusers":
        monkeypatch.setitem(sys.modules, "diffusers", None)
    else:
        args["--out"] = os.path.join(images, "latents")
    assert main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meanflow.prepare: error: ") and named in err, err
    assert not os.path.exists(os.path.join(images, "latents")) and not (tmp_path / "out" / "manifest.json").exists()


def test_dali_decoder_plumbing_on_cpu(data, tmp_path):
    """The DALI path with DALI's CPU decoder (the GPU's "mixed" one is the same pipeline): JPEGs decode to what PIL
    decodes up to decoder rounding, and a broken .jpg falls back to PIL and is named."""
    pytest.importorskip("nvidia.dali")
    from meanflow.prepare.dali_jpeg import dali_batches
    from meanflow.prepare.decode import pil_batches

    rng = np.random.default_rng(2)
    files = []
    for i in range(5):
        smooth = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # (48, 64, 3)
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(smooth).save(files[-1], quality=95)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    files.append(str(tmp_path / "bad.jpg"))
    batches = [[0, 1, 2], [3, 4, 5]]
    ref = list(pil_batches(files, batches, SIZE, 0))
    got = list(dali_batches(files, batches, SIZE, 0, device="cpu"))
    for a, b in zip(ref, got):
        assert a.indices == b.indices and a.ok == b.ok and a.errors.keys() == b.errors.keys()
        assert (a.images.int() - b.images.int()).abs().max() <= 8
    assert got[1].errors.keys() == {5}
