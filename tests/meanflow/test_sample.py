"""python -m meanflow.sample on runs whose samples are not images: vector (MLP) and 4-channel (latent) runs; bad
arguments refused before any loading or sampling; non-finite samples refused rather than written."""

import os
import sys

import numpy as np
import pytest
import torch

import meanflow.sample as sample_cli
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


def write_run(run_dir, overrides, nan_weights=False):
    cfg = resolve_config(["--config", "smoke", *overrides])
    model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    if nan_weights:  # what a diverged run's EMA holds
        with torch.no_grad():
            for w in model.parameters():
                w.fill_(float("nan"))
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


@pytest.fixture
def no_sampling(monkeypatch):
    """Records whether main() got as far as loading a checkpoint or sampling."""
    calls = []

    def recorder(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return f

    monkeypatch.setattr(sample_cli, "load_run", recorder("load_run"))
    monkeypatch.setattr(sample_cli, "sample_grid", recorder("sample_grid"))
    return calls


BAD_ARGS = [
    (["--device", "foo"], ["--device", "unknown device 'foo'"]),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], ["--device", "cuda"]),
    (["--seed", "-1"], ["--seed must be >= 0", "-1"]),
    (["--out", "{tmp}/missing/s.png"], ["--out", "missing", "does not exist"]),
    (["--out", "{tmp}/missing/s.npz", "--n", "100000", "--steps", "50"], ["missing", "does not exist"]),
]


@pytest.mark.parametrize("args,needles", BAD_ARGS, ids=["device-foo", "device-cuda", "seed", "out-png", "out-npz"])
def test_bad_arguments_fail_before_loading_or_sampling(args, needles, tmp_path, no_sampling, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert sample_cli.main(["--run", str(run_dir), *args]) == 2
    assert no_sampling == []  # nothing loaded, nothing sampled: the check came first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meanflow.sample: error: "), err
    for needle in needles:
        assert needle.replace("{tmp}", str(tmp_path)) in err[0], (needle, err[0])
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_non_finite_samples_are_refused_naming_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, [], nan_weights=True)
    out = tmp_path / "s.npz"
    p = run([sys.executable, "-m", "meanflow.sample", "--run", str(run_dir), "--n", "4", "--out", str(out)],
            cli_env(tmp_path / "cache"), check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    ckpt = os.path.join(str(run_dir), "checkpoints", "step_00000001")
    for needle in ("meanflow.sample: error: checkpoint", ckpt, "4 of 4 samples hold NaN or inf", "nothing written"):
        assert needle in line, (needle, line)
    assert not out.exists() and p.stdout == ""
