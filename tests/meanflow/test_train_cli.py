"""The trainer's command line as a user meets it: --help generated from the config dataclasses, --print-config that
round-trips, the run summary at start, and a rank-0 failure that ends every rank at once."""

import dataclasses
import json
import sys
import time

import pytest

from meanflow.config import PRESETS, config_from_dict, field_docs, help_text, resolve_config, section_types
from tests.meanflow.cli import cli_env, run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


def test_every_key_is_documented_and_listed_in_help():
    """Each field of each section has a comment in the code (its documentation), and --help shows the key with its
    default, type and that comment; and every preset is listed."""
    text = help_text()
    for section, cls in section_types().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no comment in {cls.__module__}: document it"
            default = getattr(cls(), f.name)
            shown = repr(default) if default == "" else default
            assert f"--{section}.{f.name}={shown}  (" in text, f"{section}.{f.name} missing from --help"
            assert docs[f.name] in text
    for name in PRESETS:
        assert f"  {name} " in text


def test_help_from_the_command_line(env):
    for flag in ("--help", "-h"):
        p = run([sys.executable, "-m", "meanflow.train", flag], env)
        assert p.stdout.startswith("usage:") and "--optim.lr=0.0001  (float)" in p.stdout and not p.stderr


def test_print_config_round_trips(env, tmp_path):
    args = ["--config", "smoke", "--optim.lr=3e-4", "--train.steps=17", "--objective.cfg_w=1.5"]
    p = run([sys.executable, "-m", "meanflow.train", *args, "--print-config"], env)
    path = tmp_path / "resolved.json"
    path.write_text(p.stdout)
    again = run([sys.executable, "-m", "meanflow.train", "--config", str(path), "--print-config"], env)
    assert again.stdout == p.stdout
    assert resolve_config(["--config", str(path)]) == resolve_config(args)
    assert config_from_dict(json.loads(p.stdout)).optim.lr == 3e-4
    assert not (tmp_path / "runs").exists()  # printing trains nothing


def test_unknown_key_names_the_valid_choices(env):
    p = run([sys.executable, "-m", "meanflow.train", "--optim.learning_rate=1", "--print-config"], env, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown key 'optim.learning_rate'; valid keys of optim: lr, beta1" in p.stderr


def test_run_summary_printed_at_start_and_stored(env, tmp_path):
    out = tmp_path / "run"
    p = run([sys.executable, "-m", "meanflow.train", "--config", "smoke", f"--train.out={out}", "--train.steps=2",
             "--train.samples_at_end=0"], env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["device"] == "cpu" and summary["resume_step"] is None
    assert summary["cpu_threads"] == int(env["OMP_NUM_THREADS"]) == 1  # cli_env: one thread
    assert summary["precision"] == {"params": "float32", "compute": "float32", "tangent": "float32",
                                    "reduce": "float32", "tf32": True}
    assert summary["parameters"] == 207936  # DiT-Nano/8 at 32x32x1, 10 classes
    # meanflow.flops' step count (forward, backward, a dual pass of the r != t quarter; smoke has no guidance) on the
    # forward counted here: 3 F - E + 2/8 (2 F + A), E and A (the patch embed and first time-embedder Linears, the
    # attention) a few percent of F
    f = summary["forward_flops_per_image"]
    assert 3.4 * f < summary["step_flops_per_image"] < 3.5 * f
    assert summary["data"]["items"] == 5000 and summary["data"]["backend"] in ("dali", "torch")
    assert set(summary["kernels"]) == {"attention", "adaln_modulate", "gated_residual", "gelu_tanh"}
    assert "start: fresh" in p.stderr and "kernels: attention torch" in p.stderr
    resumed = run([sys.executable, "-m", "meanflow.train", "--config", "smoke", f"--train.out={out}",
                   "--train.steps=3", "--train.samples_at_end=0"], env)
    assert json.loads((out / "summary.json").read_text())["resume_step"] == 2
    assert "start: resumed at step 2" in resumed.stderr


def test_a_rank_zero_failure_ends_every_rank_promptly(env, tmp_path):
    """Rank 0 alone cannot write the run folder (its parent is a file; the first write is its lock file): it reports
    that in one line, and rank 1 stops at once instead of waiting in the next collective (gloo's default timeout is
    30 minutes)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    start = time.perf_counter()
    p = run([*launcher, "-m", "meanflow.train", "--config", "smoke", f"--train.out={blocker}/run"], env, check=False)
    elapsed = time.perf_counter() - start
    assert p.returncode != 0 and elapsed < 60, f"took {elapsed:.0f} s"
    assert f"meanflow.train: error: train.out: cannot create the lock file {blocker}/run/.lock" in p.stderr
    assert "rank 0 failed" in p.stderr
