"""The trainer end to end on CPU: 1 vs 2 processes, SIGKILL and resume, resharded checkpoints, bad input.

Where runs of different engines, precisions or process counts are compared they start from random weights
(tests.meanflow.randomized_train): the smoke model is adaLN-Zero, whose u and du/dt are exactly 0 at step 1 and whose
blocks get no gradient before their gates move, so zero-initialised runs agree at first whatever the engine does.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.meanflow.cli import REPO, cli_env, run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))  # the embedded MNIST cache, built once per module


RANDOMIZED = "tests.meanflow.randomized_train"  # meanflow.train from random weights, with a report line per process


def train_cmd(nproc, *args, module="meanflow.train"):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    prefix = launcher if nproc > 1 else [sys.executable]
    return [*prefix, "-m", module, "--config", "smoke", *args]


def randomized_cmd(nproc, *args):
    return train_cmd(nproc, *args, module=RANDOMIZED)


def reports(p, nproc):
    """The randomized_train report of each process, by rank; it proves the trainer ran the randomised model."""
    found = {}
    for line in p.stdout.splitlines():
        if line.startswith("randomized_train "):
            r = json.loads(line.split(" ", 1)[1])
            found[r["rank"]] = r
    assert sorted(found) == list(range(nproc)), p.stdout[-2000:]
    for r in found.values():
        assert r["u_norm"] > 1.0, r  # u at step 1: exactly 0 from the zero-initialised model
    return found


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def snapshot(folder):
    """Every file under folder with its size, mtime and content hash."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def two_process_run(env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "two")
    reports(run(randomized_cmd(2, f"--train.out={out}", "--train.steps=6"), env), 2)
    return out


def test_two_processes_match_one_process(env, two_process_run, tmp_path):
    one = str(tmp_path / "one")
    reports(run(randomized_cmd(1, f"--train.out={one}", "--train.steps=6"), env), 1)
    a, b = metrics(one), metrics(two_process_run)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for ma, mb in zip(a, b):
        for key in ("loss", "mse", "grad_norm"):
            assert ma[key] == pytest.approx(mb[key], rel=2e-5), (ma["step"], key)
    assert len({m["loss"] for m in a}) > 1  # the loss moves: a constant would match trivially


def test_two_process_checkpoint_samples_the_same_in_one_process(two_process_run, tmp_path, env):
    out = tmp_path / "resampled.npz"
    rows = 10 * 2  # smoke: 10 classes x samples_at_end 2, seed train.seed: the trainer's own grid
    p = run([sys.executable, "-m", "meanflow.sample", "--run", two_process_run, "--n", str(rows), "--out", str(out)],
            env)
    said = json.loads(p.stdout.strip().splitlines()[-1])
    assert said["out"] == str(out) and said["step"] == 6
    ours = np.load(out)["samples"]
    trainer = np.load(os.path.join(two_process_run, "samples.npz"))["samples"]
    assert ours.shape == trainer.shape == (20, 1, 32, 32)
    np.testing.assert_allclose(ours, trainer, rtol=1e-5, atol=1e-5)
    assert np.abs(trainer).max() > 0.05


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(env, tmp_path):
    args = ["--train.steps=40", "--checkpoint.every=10", "--checkpoint.keep_last=0"]
    straight = str(tmp_path / "straight")
    reports(run(randomized_cmd(1, f"--train.out={straight}", *args), env), 1)

    crashed = str(tmp_path / "crashed")
    cmd = randomized_cmd(1, f"--train.out={crashed}", *args)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        path = os.path.join(crashed, "metrics.jsonl")
        if os.path.exists(path):
            steps = [json.loads(ln)["step"] for ln in open(path) if ln.strip().endswith("}")]
            if steps and steps[-1] >= 15:
                os.killpg(proc.pid, signal.SIGKILL)  # between the checkpoints at 10 and 20
                killed_at = steps[-1]
                break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None and killed_at < 40, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(crashed, "samples.png"))

    p = run(cmd, env)
    assert "resumed from" in p.stderr
    reports(p, 1)
    a, b = metrics(straight), metrics(crashed)
    assert [m["step"] for m in b] == list(range(1, 41))
    for ma, mb in zip(a, b):
        assert ma["loss"] == mb["loss"] and ma["mse"] == mb["mse"], ma["step"]


def _fails_cleanly(p, *needles):
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr[-2000:])


def test_bad_input_fails_cleanly_and_changes_nothing(env, tmp_path, monkeypatch, capsys):
    good = str(tmp_path / "good")
    run(train_cmd(1, f"--train.out={good}", "--train.steps=3"), env)
    before = snapshot(good)

    cases = [
        (["--data.root=" + str(tmp_path / "missing")], ["data.root", "missing"]),
        (["--train.stepz=3"], ["train.stepz", "valid keys of train"]),
        (["--train.global_batch=-4"], ["train.global_batch"]),
        (["--model.name=DiT-Nano/4"], ["different model", good]),
        (["--data.source=lmdb"], ["data.source", "npy"]),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--data.root=" + str(empty)], [str(empty)]))
    corrupt = tmp_path / "corrupt" / "cls0"
    corrupt.mkdir(parents=True)
    np.save(corrupt / "a.npy", np.random.default_rng().standard_normal((1, 32, 32)).astype(np.float32))
    (corrupt / "b.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    cases.append((["--data.root=" + str(corrupt.parent)], ["b.npy"]))
    # in this process (each start of a new one imports torch, ~4 s); the one below runs as a user would
    from meanflow import train

    for key in ("MEANFLOW_CACHE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for extra, needles in cases:
        code = train.main(["--config", "smoke", f"--train.out={good}", "--train.steps=6", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "meanflow.train: error:" in err, (extra, err[-2000:])
        for needle in needles:
            assert needle in err, (extra, needle, err[-2000:])
        assert snapshot(good) == before, extra

    # a folder that is not a run folder is never written into
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    p = run(train_cmd(1, f"--train.out={other}"), env, check=False)
    _fails_cleanly(p, "config.json")
    assert os.listdir(other) == ["notes.txt"]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(env, tmp_path):
    out = str(tmp_path / "diverge")
    args = ["--optim.lr=1e30", "--train.max_bad_steps=2", "--checkpoint.every=1", "--checkpoint.keep_last=0",
            "--train.steps=20"]
    p = run(train_cmd(1, f"--train.out={out}", *args), env, check=False)
    _fails_cleanly(p, "diverged", "consecutive non-finite steps")
    rows = metrics(out)
    assert rows[-1]["skipped_steps"] >= 1
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts and all(not c.startswith(".") for c in ckpts)
    # the newest checkpoint still loads and samples
    q = run([sys.executable, "-m", "meanflow.sample", "--run", out, "--n", "4", "--out", str(tmp_path / "s.npz")],
            env)
    assert json.loads(q.stdout.strip().splitlines()[-1])["n"] == 4


# mse of a bf16 run relative to the fp32 run, step by step (the randomised smoke run, every row with r != t, 4 steps):
#   bf16 rounding            7.4e-4 (autocast, 1 process), 6.4e-4 (FSDP's policy, 2); at most 1.3e-3 with two other
#                            weight seeds
#   du/dt zeroed (--zero-dudt, the tangent lost)   6.7e-2 to 1.0e-1 at every step, fp32 and bf16 alike; at least
#                            2.7e-2 with the other seeds
# 5e-3 sits about 4x above the largest rounding gap and 5x below the smallest du/dt-lost one. ratio_r_neq_t = 1 puts
# (t - r) du/dt into every row's target: with smoke's 0.25 (2 rows of 8) losing du/dt moves some steps by only 9e-4.
BF16_MSE_REL = 5e-3


def test_bf16_mixed_precision_tracks_fp32(env, tmp_path):
    """bf16 compute with fp32 master weights and an fp32 tangent, through autocast (1 process) and through FSDP2's
    mixed-precision policy (2), stays within bf16 rounding of the fp32 run and far from a run that lost du/dt."""
    common = ["--train.steps=4", "--objective.ratio_r_neq_t=1.0"]
    rows, seen = {}, {}
    for name, nproc, precision in (("fp32", 1, "fp32"), ("autocast", 1, "bf16"), ("fsdp", 2, "bf16")):
        out = str(tmp_path / name)
        p = run(randomized_cmd(nproc, f"--train.out={out}", f"--train.precision={precision}", *common), env)
        rows[name], seen[name] = metrics(out), reports(p, nproc)

    # what the model saw in its first forward: (first block's qkv weight, its output, u, du/dt)
    def dtypes(r):
        return r["qkv_weight"], r["qkv_out"], r["u"], r["dudt"]

    f32, bf16 = "torch.float32", "torch.bfloat16"
    assert dtypes(seen["fp32"][0]) == (f32, f32, f32, f32)
    assert dtypes(seen["autocast"][0]) == (f32, bf16, bf16, f32)  # fp32 weights, bf16 matmuls
    for rank in (0, 1):
        assert dtypes(seen["fsdp"][rank]) == (bf16, bf16, bf16, f32)  # the policy's bf16 copies of the weights
    for name in ("autocast", "fsdp"):
        assert [m["step"] for m in rows[name]] == [1, 2, 3, 4]
        for ref, got in zip(rows["fp32"], rows[name]):
            assert got["mse"] == pytest.approx(ref["mse"], rel=BF16_MSE_REL), (name, ref["step"])
    assert rows["fsdp"][-1]["mse"] < rows["fsdp"][0]["mse"]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(env, tmp_path):
    """--train.compile=true (each block's forward and dual through torch.compile; ~1 min cold on a CPU)."""
    rows = {}
    for flag in ("false", "true"):
        out = str(tmp_path / f"compile-{flag}")
        reports(run(randomized_cmd(1, f"--train.out={out}", "--train.steps=4", f"--train.compile={flag}"), env), 1)
        rows[flag] = metrics(out)
    for a, b in zip(rows["false"], rows["true"]):
        for key in ("loss", "mse", "grad_norm"):  # the gradient too: a wrong backward shows there first
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
