"""meanflow/vae.py on a tiny randomly initialised AutoencoderKL saved to a temporary folder (no network)."""

import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from meanflow.vae import VAEError, decode_latents, encode_moments, latent_shape, load_vae, vae_identity  # noqa: E402


def save_tiny_vae(folder, blocks=2, seed=0):
    """A random AutoencoderKL with `blocks` encoder blocks (downsampling 2^(blocks-1)) saved to `folder`."""
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                                  up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4,
                                  layers_per_block=1, norm_num_groups=32, sample_size=32)
    vae.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def test_encode_decode_shapes_and_ranges(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    mean, std = encode_moments(vae, images)
    assert mean.shape == std.shape == (3, 4, 8, 8) == (3, *latent_shape(vae, 16))
    assert mean.dtype == std.dtype == torch.float32 and (std > 0).all()
    out = decode_latents(vae, mean)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 16, 16)


def test_encode_maps_pixels_to_minus_one_one(tiny_vae_dir):
    """The encoder sees u8 / 127.5 - 1: the same as calling diffusers directly on that tensor."""
    vae = load_vae(tiny_vae_dir)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean, std = encode_moments(vae, images)
    with torch.no_grad():
        posterior = vae.encode(images.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)


def test_identity_ignores_location_but_not_architecture(tiny_vae_dir, tmp_path):
    vae = load_vae(tiny_vae_dir)
    ident = vae_identity(vae, tiny_vae_dir)
    assert ident["path"] == os.path.abspath(tiny_vae_dir) and len(ident["config_sha256"]) == 64
    moved = save_tiny_vae(tmp_path / "moved")
    assert vae_identity(load_vae(moved), moved)["config_sha256"] == ident["config_sha256"]
    other = save_tiny_vae(tmp_path / "other", blocks=3)
    assert vae_identity(load_vae(other), other)["config_sha256"] != ident["config_sha256"]


def test_missing_path_and_bad_folder_are_named(tmp_path):
    with pytest.raises(VAEError, match=r"--vae .*nope.*no such file"):
        load_vae(str(tmp_path / "nope"))
    with pytest.raises(VAEError, match=r"--vae .*config.json"):
        load_vae(str(tmp_path))


def test_bad_images_rejected(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    with pytest.raises(VAEError, match="uint8"):
        encode_moments(vae, torch.zeros(1, 3, 16, 16))
    with pytest.raises(VAEError, match="multiple"):
        encode_moments(vae, torch.zeros(1, 3, 15, 15, dtype=torch.uint8))


def test_without_diffusers_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(VAEError, match=r"pip install -e \.\[vae\]"):
        load_vae("/anything")
