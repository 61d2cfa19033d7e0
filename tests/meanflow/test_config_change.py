"""Resuming with a changed config (meanflow.trainer.config_change): each changed key is said; safe ones apply; the
optimizer's lr, betas and weight decay really run (the next checkpoint's optimizer state holds them); recipe changes
are refused unless --train.allow_config_change=true; earlier config.json files are kept as config.<step>.json;
train.steps at or below the checkpoint's step writes nothing."""

import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from meanflow.trainer.config_change import kind
from tests.meanflow.cli import cli_env, run
from tests.meanflow.test_train import metrics, snapshot, train_cmd


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


BASE = ["--checkpoint.every=2", "--checkpoint.keep_last=0", "--train.samples_at_end=0"]


@pytest.fixture(scope="module")
def four_steps(env, tmp_path_factory):
    """A smoke run to step 4 (checkpoints at 2 and 4), copied by each test that changes it."""
    out = str(tmp_path_factory.mktemp("runs") / "base")
    run(train_cmd(1, f"--train.out={out}", "--train.steps=4", *BASE), env)
    return out


@pytest.fixture
def resumed(four_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(four_steps, out)
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def saved_param_group(run_dir, step, tmp_path):
    """The optimizer's first param group as saved in checkpoints/step_<step> (lr, betas, weight_decay, ...)."""
    flat = str(tmp_path / f"step{step}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), flat)
    return torch.load(flat, weights_only=False)["optim"]["param_groups"][0]


@pytest.mark.parametrize("key, expected", [
    ("optim.lr", "optimizer"), ("optim.beta1", "optimizer"), ("optim.beta2", "optimizer"),
    ("optim.weight_decay", "optimizer"), ("optim.warmup_steps", "applied"), ("optim.ema_decay", "applied"),
    ("train.steps", "applied"), ("train.precision", "applied"), ("train.out", "applied"), ("log.every", "applied"),
    ("checkpoint.keep_last", "applied"), ("data.num_workers", "applied"), ("data.loader", "applied"),
    ("train.global_batch", "recipe"), ("train.seed", "recipe"), ("objective.time_mu", "recipe"),
    ("data.root", "recipe"), ("data.hflip", "recipe"), ("model.depth", "recipe"),
])
def test_each_key_has_its_kind(key, expected):
    assert kind(key) == expected


def test_safe_and_optimizer_changes_apply_and_earlier_configs_are_kept(env, resumed, tmp_path):
    before = read_json(os.path.join(resumed, "config.json"))
    p = run(train_cmd(1, f"--train.out={resumed}", "--train.steps=6", "--optim.lr=2e-3", "--optim.beta2=0.9",
                      "--optim.weight_decay=0.1", "--log.every=2", *BASE), env)
    for line in ("optim.lr: 0.001 -> 0.002 (applied to the optimizer's param groups)",
                 "optim.beta2: 0.95 -> 0.9 (applied to the optimizer's param groups)",
                 "optim.weight_decay: 0.0 -> 0.1 (applied to the optimizer's param groups)",
                 "train.steps: 4 -> 6 (applied)", "log.every: 1 -> 2 (applied)"):
        assert f"config change since step 4: {line}" in p.stderr, (line, p.stderr[-3000:])
    assert "resumed from" in p.stderr
    # the optimizer ran with the new values, not the ones its loaded state came with
    group = saved_param_group(resumed, 6, tmp_path)
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (2e-3, (0.9, 0.9), 0.1)
    assert saved_param_group(resumed, 4, tmp_path)["weight_decay"] == 0.0
    rows = metrics(resumed)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 6] and rows[-1]["lr"] == 2e-3
    # config.json states what ran; the one it replaced is kept under the step it was resumed from
    now = read_json(os.path.join(resumed, "config.json"))
    assert (now["optim"]["weight_decay"], now["train"]["steps"]) == (0.1, 6)
    assert read_json(os.path.join(resumed, "config.4.json")) == before

    p = run(train_cmd(1, f"--train.out={resumed}", "--train.steps=8", "--optim.lr=2e-3", "--optim.beta2=0.9",
                      "--optim.weight_decay=0.1", *BASE), env)
    assert "config change since step 6: log.every: 2 -> 1 (applied)" in p.stderr
    assert "optim.lr" not in p.stderr  # unchanged since step 6
    assert read_json(os.path.join(resumed, "config.4.json")) == before  # never deleted
    assert read_json(os.path.join(resumed, "config.6.json")) == now
    assert read_json(os.path.join(resumed, "config.json"))["train"]["steps"] == 8


def test_recipe_changes_are_refused_and_change_nothing(env, resumed):
    before = snapshot(resumed)
    p = run(train_cmd(1, f"--train.out={resumed}", "--train.steps=6", "--train.seed=1", "--objective.time_mu=0.0",
                      "--optim.lr=2e-3", *BASE), env, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith("meanflow.train: error: resuming") and "(step 4) with a changed recipe" in error
    assert "train.seed: 0 -> 1" in error and "objective.time_mu: -0.4 -> 0.0" in error
    assert "optim.lr" not in error and "train.steps" not in error  # only the recipe is refused
    assert "--train.allow_config_change=true" in error
    assert snapshot(resumed) == before


def test_recipe_changes_run_with_allow_config_change(env, resumed):
    p = run(train_cmd(1, f"--train.out={resumed}", "--train.steps=6", "--train.seed=1",
                      "--train.allow_config_change=true", *BASE), env)
    assert ("config change since step 4: train.seed: 0 -> 1 (recipe change, allowed by train.allow_config_change)"
            in p.stderr), p.stderr[-3000:]
    assert [m["step"] for m in metrics(resumed)] == list(range(1, 7))
    assert read_json(os.path.join(resumed, "config.json"))["train"]["seed"] == 1
    assert read_json(os.path.join(resumed, "config.4.json"))["train"]["seed"] == 0


@pytest.mark.parametrize("steps", [3, 4])
def test_steps_at_or_below_the_checkpoint_say_so_and_write_nothing(env, resumed, steps):
    before = snapshot(resumed)
    p = run(train_cmd(1, f"--train.out={resumed}", f"--train.steps={steps}", "--train.seed=1", *BASE), env)
    said = [ln for ln in p.stdout.splitlines() if "nothing to train" in ln]
    assert len(said) == 1 and f"train.steps={steps} is at or below step 4" in said[0], p.stdout[-2000:]
    assert snapshot(resumed) == before
