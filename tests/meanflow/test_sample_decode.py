"""python -m meanflow.sample --decode on a run trained on prepared latents: the samples divided by data.scale and
decoded through the run's VAE (the manifest's, or --vae) to PNGs of the VAE's image size, a grid, or ADM's sample
.npz; and the errors when no VAE is usable."""

import json
import os

import numpy as np
import pytest

import meanflow.sample as sample_cli
from meanflow.eval_draws import evaluation_draws
from meanflow.sample import load_run
from meanflow.sampling import sample, sample_grid
from tests.meanflow.test_evaluate_latents import save_tiny_vae, write_latent_folder, write_latent_run


@pytest.fixture(scope="module")
def sd_geometry_run(tmp_path_factory):
    """A run on (4, 4, 4) latents of a 4-block VAE: SD-VAE's /8 geometry, so images are 32 x 32."""
    base = tmp_path_factory.mktemp("decode")
    vae = save_tiny_vae(base / "vae", blocks=4)
    root = write_latent_folder(base / "latents", vae, 32)
    return write_latent_run(base / "run", root, num_classes=3), vae


def read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cli(argv, capsys):
    code = sample_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def hand_decoded(run_dir, vae_path, n, balanced=False):
    """The samples decoded by hand: the grid's (or evaluate's class-balanced draws) with the run's seed, divided by
    data.scale, through the VAE's decoder."""
    from meanflow.vae import decode_latents, load_vae

    cfg, model, _, _ = load_run(run_dir)
    if balanced:
        noise, labels = evaluation_draws(cfg.train.seed, n, (4, 4, 4), 3)
        x = sample(model, noise, labels, steps=1)
    else:
        x, labels, _ = sample_grid(model, n, num_classes=3, sample_shape=(4, 4, 4), seed=cfg.train.seed)
    return decode_latents(load_vae(vae_path), x / cfg.data.scale).permute(0, 2, 3, 1).numpy(), labels


def test_decode_writes_one_png_per_sample_at_the_vae_image_size(sd_geometry_run, tmp_path, capsys):
    run_dir, vae = sd_geometry_run
    out = tmp_path / "pngs"
    code, stdout, err = cli(["--run", run_dir, "--decode", "--n", "5", "--out", str(out)], capsys)
    assert code == 0, err
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert printed["files"] == 5 and printed["image_size"] == 32 and printed["vae"] == vae
    want, labels = hand_decoded(run_dir, vae, 5)
    names = sorted(os.listdir(out))
    assert names == [f"{i:06d}_class{int(y)}.png" for i, y in enumerate(labels)]
    for i, name in enumerate(names):
        image = read_png(out / name)
        assert image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, want[i])  # decoded from sample / data.scale, nothing else


def test_decode_to_an_adm_npz_and_to_a_grid(sd_geometry_run, tmp_path, capsys):
    run_dir, vae = sd_geometry_run
    code, _, err = cli(["--run", run_dir, "--decode", "--n", "4", "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    want, labels = hand_decoded(run_dir, vae, 4, balanced=True)
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(z["arr_0"], want)
        np.testing.assert_array_equal(z["arr_1"], labels.numpy())
    code, _, err = cli(["--run", run_dir, "--decode", "--n", "4", "--out", str(tmp_path / "grid.png")], capsys)
    assert code == 0, err
    assert read_png(tmp_path / "grid.png").shape[2] == 3


def test_decode_default_folder_and_vae_override(sd_geometry_run, tmp_path, capsys):
    run_dir, vae = sd_geometry_run
    code, stdout, err = cli(["--run", run_dir, "--decode", "--n", "2", "--vae", vae, "--steps", "2"], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["out"] == os.path.abspath(os.path.join(run_dir,
                                                                                             "samples_2nfe"))
    assert len(os.listdir(os.path.join(run_dir, "samples_2nfe"))) == 2


def test_no_usable_vae_names_vae_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("diffusers")
    root = write_latent_folder(tmp_path / "latents", str(tmp_path / "moved-vae"), 32)
    run_dir = write_latent_run(tmp_path / "run", root)
    code, stdout, err = cli(["--run", run_dir, "--decode", "--n", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and stdout == "" and "error: --vae: decoding needs the run's VAE" in err
    assert "moved-vae" in err and not os.path.exists(tmp_path / "o")
    code, _, err = cli(["--run", run_dir, "--decode", "--n", "2", "--vae", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "--vae" in err and "nowhere" in err
    code, _, err = cli(["--run", run_dir, "--vae", str(tmp_path), "--out", str(tmp_path / "x.npz")], capsys)
    assert code == 2 and "--vae is used only with --decode" in err
