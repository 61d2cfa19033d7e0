"""Damaged checkpoints (meanflow.checkpoint's checksums): a truncated, empty or changed shard or a missing .metadata in
the newest checkpoint is named, set aside as step_N.damaged-REASON and the previous one resumed; none left is exit 2;
meanflow.sample and meanflow.evaluate name it and exit 2, touching nothing."""

import json
import os
import shutil
import sys

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.meanflow.cli import cli_env, run
from tests.meanflow.test_train import metrics, snapshot, train_cmd

NEWEST, PREVIOUS = "step_00000004", "step_00000002"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def base_run(env, tmp_path_factory):
    """A smoke run of 4 steps with checkpoints at steps 2 and 4, copied by each test before it damages one."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    run(train_cmd(1, f"--train.out={out}", "--train.steps=4", "--checkpoint.every=2", "--checkpoint.keep_last=0"), env)
    return out


@pytest.fixture
def run_dir(base_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    return out


def ckpt(run_dir, name):
    return os.path.join(run_dir, "checkpoints", name)


def flip_a_bit(folder):
    """Flip the lowest bit of one byte amid the largest tensor's data in __0_0.distcp: DCP loads such a shard without
    a word (the value changes by at most a factor of 4), so only a checksum can tell."""
    items = FileSystemReader(folder).read_metadata().storage_data.values()
    item = max((i for i in items if i.relative_path == "__0_0.distcp"), key=lambda i: i.length)
    with open(os.path.join(folder, item.relative_path), "r+b") as f:
        f.seek(item.offset + item.length // 2)
        b = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b ^ 0x01]))


def drop_checksums(folder):
    """Make a checkpoint look like one written before checksums were stored."""
    path = os.path.join(folder, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    del meta["files"]
    with open(path, "w") as f:
        json.dump(meta, f)


DAMAGE = {  # name: (what it does to a checkpoint folder, the reason it is set aside for, a word of the warning)
    "truncated_shard": (lambda c: os.truncate(os.path.join(c, "__0_0.distcp"), 1000), "size", "__0_0.distcp"),
    "empty_shard": (lambda c: os.truncate(os.path.join(c, "__0_0.distcp"), 0), "size", "__0_0.distcp"),
    "missing_metadata": (lambda c: os.remove(os.path.join(c, ".metadata")), "missing", ".metadata is missing"),
    "flipped_bit": (flip_a_bit, "checksum", "__0_0.distcp"),
    # read before resume too (the model and config checks): they must compare with the previous one, not stop
    "unparseable_meta": (lambda c: open(os.path.join(c, "meta.json"), "w").write("{not json"), "meta", "meta.json"),
}


def _resumes_from_previous(p, run_dir, reason, keep_last=1):
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if "is damaged" in ln]
    assert len(warnings) == 1, p.stderr[-3000:]
    assert ckpt(run_dir, NEWEST) in warnings[0] and f"({reason})" in warnings[0], warnings
    assert f"resumed from {ckpt(run_dir, PREVIOUS)} (step 2" in p.stderr
    left = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    # set aside under its new name, and out of keep_last's reach: pruning kept only the final step 6
    assert f"{NEWEST}.damaged-{reason}" in left and "step_00000006" in left[-1], left
    assert len([c for c in left if not c.endswith(f".damaged-{reason}")]) == keep_last, left
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 7))
    return warnings[0]


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_resumed(env, run_dir, kind):
    damage, reason, needle = DAMAGE[kind]
    damage(ckpt(run_dir, NEWEST))
    p = run(train_cmd(1, f"--train.out={run_dir}", "--train.steps=6", "--checkpoint.keep_last=1"), env, check=False)
    warning = _resumes_from_previous(p, run_dir, reason)
    assert needle in warning, warning


def test_checkpoints_without_checksums_load_with_one_warning_and_a_broken_one_is_set_aside(env, run_dir):
    """Old checkpoints: nothing to verify, so the truncated shard shows when DCP cannot load it (its
    CheckpointException, a BaseException, caught by name)."""
    for name in (NEWEST, PREVIOUS):
        drop_checksums(ckpt(run_dir, name))
    os.truncate(os.path.join(ckpt(run_dir, NEWEST), "__0_0.distcp"), 1000)
    p = run(train_cmd(1, f"--train.out={run_dir}", "--train.steps=6", "--checkpoint.keep_last=1"), env, check=False)
    _resumes_from_previous(p, run_dir, "load")
    assert p.stderr.count("cannot be verified") == 1, p.stderr[-3000:]


def test_verify_false_loads_a_changed_shard_unchecked(env, run_dir):
    flip_a_bit(ckpt(run_dir, NEWEST))
    p = run(train_cmd(1, f"--train.out={run_dir}", "--train.steps=6", "--checkpoint.verify=false"), env)
    assert f"resumed from {ckpt(run_dir, NEWEST)} (step 4" in p.stderr and "damaged" not in p.stderr


def test_all_checkpoints_damaged_exits_2_naming_them(env, run_dir):
    flip_a_bit(ckpt(run_dir, NEWEST))
    DAMAGE["missing_metadata"][0](ckpt(run_dir, PREVIOUS))
    p = run(train_cmd(1, f"--train.out={run_dir}", "--train.steps=6"), env, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith("meanflow.train: error: no checkpoint in"), error
    for name, reason in ((NEWEST, "checksum"), (PREVIOUS, "missing")):
        assert ckpt(run_dir, name) in error and f"{name}.damaged-{reason}" in error, error
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [f"{PREVIOUS}.damaged-missing",
                                                                        f"{NEWEST}.damaged-checksum"]


@pytest.mark.parametrize("module", ["meanflow.sample", "meanflow.evaluate"])
def test_sample_and_evaluate_name_a_damaged_checkpoint_and_exit_2(env, run_dir, module, tmp_path):
    flip_a_bit(ckpt(run_dir, NEWEST))
    before = snapshot(run_dir)
    p = run([sys.executable, "-m", module, "--run", run_dir, "--n", "4"], env, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith(f"{module}: error: checkpoint {ckpt(run_dir, NEWEST)} is damaged (checksum)"), error
    assert f"--checkpoint {ckpt(run_dir, PREVIOUS)}" in error, error
    assert snapshot(run_dir) == before  # a reader sets nothing aside
    if module == "meanflow.sample":  # the suggested checkpoint works
        out = str(tmp_path / "s.npz")
        q = run([sys.executable, "-m", module, "--run", run_dir, "--n", "4", "--out", out, "--checkpoint",
                 ckpt(run_dir, PREVIOUS)], env)
        assert json.loads(q.stdout.strip().splitlines()[-1])["step"] == 2


def test_two_processes_agree_on_a_shard_only_rank_1_wrote(env, tmp_path):
    """Under torchrun: rank 1's shard cut short, verification off so the load itself fails (DCP's collective error);
    both ranks set it aside together, resume from step 2 and finish."""
    out = str(tmp_path / "two")
    args = ["--checkpoint.every=2", "--checkpoint.keep_last=0"]
    run(train_cmd(2, f"--train.out={out}", "--train.steps=4", *args), env)
    os.truncate(os.path.join(ckpt(out, NEWEST), "__1_0.distcp"), 1000)
    p = run(train_cmd(2, f"--train.out={out}", "--train.steps=6", "--checkpoint.verify=false", *args), env,
            check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"{NEWEST} is damaged (load)" in p.stderr and f"resumed from {ckpt(out, PREVIOUS)} (step 2" in p.stderr
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [PREVIOUS, NEWEST, f"{NEWEST}.damaged-load",
                                                                    "step_00000006"]  # step 4 saved anew
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
