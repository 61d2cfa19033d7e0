"""python -m meanflow.sample on runs whose samples are not images: vector (MLP) and 4-channel (latent) runs."""

import os
import sys

import numpy as np
import pytest
import torch

from meanflow.checkpoint import save_checkpoint
from meanflow.config import resolve_config
from meanflow.distributed import Dist
from meanflow.images import save_samples
from meanflow.models import create_model
from tests.meanflow.cli import cli_env, run

RUNS = {
    # the trainer reads only (C, H, W) data, so these runs are written directly: a checkpoint as the trainer saves it
    "mlp": ["--model.name=MLP", "--model.in_channels=2", "--model.num_classes=0"],
    "latents": ["--model.name=DiT-Nano/8", "--model.in_channels=4", "--model.input_size=16", "--model.num_classes=0"],
}


def write_run(run_dir, overrides):
    cfg = resolve_config(["--config", "smoke", *overrides])
    model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    save_checkpoint(Dist(), str(run_dir), 1, model, model, None, {"config": cfg.to_dict()})
    return cfg


def listing(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_png_of_non_image_samples_fails_cleanly_and_writes_nothing(kind, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run(run_dir, RUNS[kind])
    before = listing(tmp_path)
    p = run([sys.executable, "-m", "meanflow.sample", "--run", str(run_dir), "--n", "4"], cli_env(tmp_path / "cache"),
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meanflow.sample: error: --out "), p.stderr
    for needle in ("PNG output needs", cfg.model.name, "--out FILE.npz"):
        assert needle in lines[0], (needle, lines[0])
    assert p.stdout == ""
    assert listing(tmp_path) == before  # no samples_1nfe.png, no temporary file


def test_vector_run_samples_to_npz(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, RUNS["mlp"])
    out = tmp_path / "v.npz"
    run([sys.executable, "-m", "meanflow.sample", "--run", str(run_dir), "--n", "5", "--out", str(out)],
        cli_env(tmp_path / "cache"))
    x = np.load(out)["samples"]
    assert x.shape == (5, 2) and np.isfinite(x).all()


def test_save_samples_refuses_a_png_of_vectors(tmp_path):
    path = tmp_path / "v.png"
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*\.npz"):
        save_samples(str(path), torch.zeros(4, 2), rows=1)
    assert os.listdir(tmp_path) == []
