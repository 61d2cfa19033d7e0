"""One trainer per run folder (meanflow.trainer.run_lock): a second trainer on a busy folder exits 2 at once, naming
the holder and writing nothing, under torchrun too; a holder killed with SIGKILL leaves nothing that blocks."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.meanflow.cli import REPO, cli_env, run
from tests.meanflow.test_train import snapshot, train_cmd


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


def _logged_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(ln)["step"] for ln in open(path) if ln.strip().endswith("}")]


def test_second_trainer_on_a_busy_folder_exits_2_naming_the_holder(env, tmp_path):
    out = str(tmp_path / "busy")
    long_run = ["--train.steps=1000000", "--checkpoint.every=1000000", "--train.samples_at_end=0"]
    first = subprocess.Popen(train_cmd(1, f"--train.out={out}", *long_run), env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not _logged_steps(out) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert _logged_steps(out) and first.poll() is None, "the first trainer did not get to its first step"
        written = {k: v for k, v in snapshot(out).items() if k != "metrics.jsonl"}  # the first still logs steps
        assert set(written) == {".lock", "config.json", "summary.json"}

        for nproc in (1, 2):
            start = time.time()
            p = run(train_cmd(nproc, f"--train.out={out}", "--train.steps=3"), env, check=False)
            took = time.time() - start
            if nproc == 1:
                assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
            else:  # torchrun exits 1 with its own report (and its own traceback) once rank 0 has exited 2
                assert p.returncode == 1 and "exitcode  : 2" in p.stderr, p.stderr[-3000:]
                assert "meanflow/trainer" not in p.stderr, p.stderr[-3000:]
            for needle in ("in use by another trainer", f"host {socket.gethostname()}", f"pid {first.pid}",
                           "started "):
                assert needle in p.stderr, (needle, p.stderr[-2000:])
            if nproc == 2:  # rank 1 stops with rank 0 instead of waiting in the next collective
                assert "this rank stops too" in p.stderr, p.stderr[-3000:]
            assert took < 90, took  # at once, not when the first trainer ends (it would run for hours)
            assert first.poll() is None
            assert {k: v for k, v in snapshot(out).items() if k != "metrics.jsonl"} == written, nproc
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    # the kernel dropped the dead trainer's lock: the next one starts (fresh: the first saved no checkpoint)
    p = run(train_cmd(1, f"--train.out={out}", "--train.steps=2", "--train.samples_at_end=0"), env)
    assert "start: fresh" in p.stderr
    assert _logged_steps(out) == [1, 2]
    with open(os.path.join(out, ".lock")) as f:
        holder = f.read()
    assert f"pid {first.pid}," not in holder and holder.startswith(f"host {socket.gethostname()}, pid ")


def test_a_folder_holding_only_a_lock_file_starts_fresh(env, tmp_path):
    """A trainer killed between taking the lock and writing config.json leaves only .lock: still a fresh folder."""
    out = tmp_path / "only-lock"
    out.mkdir()
    (out / ".lock").write_text("host elsewhere, pid 1, started long ago\n")
    p = run(train_cmd(1, f"--train.out={out}", "--train.steps=1", "--train.samples_at_end=0"), env)
    assert "start: fresh" in p.stderr
    assert _logged_steps(str(out)) == [1]
