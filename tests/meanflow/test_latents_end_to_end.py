"""ImageNet's path at toy size, end to end on the CPU, as a user runs it: an image folder (with one file that does not
decode) -> `meanflow.prepare latents` through a random AutoencoderKL -> a few training steps on the shards ->
`meanflow.sample --decode` -> `meanflow.evaluate` against the image folder (the FID code path, real Inception)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from meanflow.data import DataConfig, build_loader  # noqa: E402
from meanflow.data.dali_backend import dali_available  # noqa: E402
from tests.meanflow.cli import cli_env, run  # noqa: E402
from tests.meanflow.test_prepare import write_image_folder  # noqa: E402
from tests.meanflow.test_vae import save_tiny_vae  # noqa: E402

SIZE = 16  # images; the 2-block VAE halves them: (4, 8, 8) latents, 16 tokens of a patch-2 DiT
SCALE = 0.5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(images folder, VAE folder, prepared folder, env): 10 random PNGs in each of 2 classes plus one broken one."""
    base = tmp_path_factory.mktemp("e2e")
    write_image_folder(base / "images", ("class_a", "class_b"), 10, SIZE, 3 * SIZE)
    (base / "images" / "class_b" / "broken.png").write_bytes(b"not an image")
    vae = save_tiny_vae(base / "vae")
    env = cli_env(base / "cache")
    run([sys.executable, "-m", "meanflow.prepare", "latents", "--images", str(base / "images"), "--out",
         str(base / "latents"), "--vae", vae, "--size", str(SIZE), "--shard-size", "8", "--batch", "4"], env)
    return str(base / "images"), vae, str(base / "latents"), env


def test_prepared_folder_counts_the_broken_image(prepared):
    manifest = json.load(open(os.path.join(prepared[2], "manifest.json")))
    assert manifest["count"] == 20 and manifest["shape"] == [4, SIZE // 2, SIZE // 2]
    assert manifest["skipped_count"] == 1 and manifest["skipped"][0]["path"].endswith("broken.png")
    assert manifest["classes"] == ["class_a", "class_b"]


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable")
def test_dali_and_torch_serve_the_same_batches_of_the_prepared_folder(prepared):
    cfg = dict(source="latents", root=prepared[2], hflip=True, scale=SCALE, num_workers=0)
    loaders = [build_loader(DataConfig(loader=b, **cfg), 4, 1, 2, seed=3) for b in ("torch", "dali")]
    try:
        for epoch in range(2):
            for (xt, yt), (xd, yd) in zip(*(loader.epoch(epoch) for loader in loaders), strict=True):
                assert torch.equal(xt, xd) and torch.equal(yt, yd)
    finally:
        for loader in loaders:
            loader.close()


def test_train_on_the_shards_then_decode_and_score(prepared, tmp_path):
    images, vae, latents, env = prepared
    out = str(tmp_path / "run")
    run([sys.executable, "-m", "meanflow.train", "--config", "smoke", f"--train.out={out}", "--model.name=DiT-Nano/2",
         "--model.in_channels=4", f"--model.input_size={SIZE // 2}", "--model.num_classes=2", f"--data.root={latents}",
         f"--data.scale={SCALE}", "--data.hflip=true", "--train.steps=4", "--train.global_batch=4",
         "--train.samples_at_end=0"], env)
    summary = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert summary[-1]["step"] == 4 and np.isfinite(summary[-1]["loss"])

    pngs = str(tmp_path / "decoded")
    p = run([sys.executable, "-m", "meanflow.sample", "--run", out, "--decode", "--n", "6", "--out", pngs], env)
    json.loads(p.stdout.strip().splitlines()[-1])  # the public contract: one JSON object, the last line of stdout
    files = sorted(os.listdir(pngs))
    assert len(files) == 6
    with Image.open(os.path.join(pngs, files[0])) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"  # the VAE's image size, not the latent's

    p = run([sys.executable, "-m", "meanflow.evaluate", "--run", out, "--ref", images, "--n", "6", "--steps", "1",
             "--batch", "6"], env)
    result = json.load(open(os.path.join(out, "eval_step_4.json")))
    assert json.loads(p.stdout.strip().splitlines()[-1])["fid_1nfe"] == result["fid_1nfe"]
    assert np.isfinite(result["fid_1nfe"]) and result["fid_1nfe"] > 0 and result["n"] == 6
    assert result["reference_count"] == 20  # the broken image is skipped, as prepare skipped it
