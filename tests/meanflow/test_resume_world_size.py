"""A checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2 (CPU, gloo, FSDP2 under
torchrun), continuing at the same step with the same data, noise and times, and the losses of an uninterrupted run.

Runs start from random weights (tests.meanflow.randomized_train; a zero-initialised model would agree trivially) and
log what every step fed the objective (tests.meanflow.batch_log_train). Two uninterrupted references of STEPS steps,
one per world size, checkpoint at CUT. A copy of one reference's folder without its newer checkpoint is the state
of a job that died after step CUT (the metrics lines past CUT are dropped on resume); it is resumed at the other
world size, as a user would: the same command with another --nproc_per_node.

Tolerance. The global batch, its order, noise and times do not depend on the world size (meanflow/data/order.py,
objective.draw over the global batch), so the batches are compared for equality. The losses are not bit-equal: one
process means the loss over 8 rows and sums the gradient over them in one order; two processes mean 4 rows each,
then average across ranks (gloo all-reduce; FSDP2 reduce-scatters the gradients), another fp32 summation order.
Measured here (smoke, 8 steps): 1 vs 2 processes differ by at most ~1e-7 relative in loss, mse and grad norm, a few
fp32 ulps, and AdamW's normalised update does not amplify them over these steps. REL = 2e-6 sits 10x above that
and orders of magnitude below any real change (a different batch or noise moves the loss by ~1e-2 relative).
"""

import json
import os
import shutil
import sys

import pytest

from tests.meanflow.cli import cli_env, run

STEPS, CUT, REL = 8, 4, 2e-6
LOGGED = "tests.meanflow.batch_log_train"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


def train(env, nproc, out, log_dir):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", LOGGED, "--config", "smoke", f"--train.out={out}",
           f"--train.steps={STEPS}", f"--checkpoint.every={CUT}", "--checkpoint.keep_last=0",
           "--train.samples_at_end=0"]
    return run(cmd, dict(env, BATCH_LOG=str(log_dir)))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def global_batches(log_dir, nproc):
    """[{key: values over the global batch}] per step: the ranks' rows of each step joined in rank order."""
    per_rank = []
    for rank in range(nproc):
        with open(os.path.join(log_dir, f"rank{rank}.jsonl")) as f:
            per_rank.append([json.loads(line) for line in f])
    assert len({len(lines) for lines in per_rank}) == 1  # every rank ran every step
    return [{key: sum((lines[s][key] for lines in per_rank), []) for key in per_rank[0][s]}
            for s in range(len(per_rank[0]))]


@pytest.fixture(scope="module")
def references(env, tmp_path_factory):
    """{nproc: (run folder, global batches)} of uninterrupted runs at 1 and 2 processes."""
    root = tmp_path_factory.mktemp("references")
    refs = {}
    for nproc in (1, 2):
        out, logs = root / f"run{nproc}", root / f"batches{nproc}"
        train(env, nproc, out, logs)
        refs[nproc] = (str(out), global_batches(logs, nproc))
    return refs


def test_references_agree_across_world_sizes(references):
    """The baseline the resumes are held to: the same batches at every step, losses within REL."""
    (one, b1), (two, b2) = references[1], references[2]
    assert b1 == b2 and len(b1) == STEPS
    for a, b in zip(metrics(one), metrics(two)):
        for key in ("loss", "mse", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=REL), (a["step"], key)
    assert len({m["loss"] for m in metrics(one)}) == STEPS  # the loss moves: a constant would match trivially
    for nproc, (out, _) in references.items():  # CPU runs: throughput and model TFLOP/s logged, no peak hence no MFU
        with open(os.path.join(out, "summary.json")) as f:
            step_flops = json.load(f)["step_flops_per_image"]  # meanflow.flops' count
        for m in metrics(out):
            assert m["img_per_s"] > 0 and m["mfu"] is None
            assert m["tflops_per_device"] == pytest.approx(step_flops * m["img_per_s"] / nproc / 1e12, rel=1e-9)


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2)], ids=["2->1", "1->2"])
def test_checkpoint_resumes_on_another_world_size(env, references, tmp_path, saved_by, resumed_by):
    source, _ = references[saved_by]
    out = tmp_path / "run"
    shutil.copytree(source, out)
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")  # the job died after its step-CUT checkpoint
    with open(out / "checkpoints" / f"step_{CUT:08d}" / "meta.json") as f:
        assert json.load(f)["world_size"] == saved_by

    p = train(env, resumed_by, out, tmp_path / "batches")
    assert f"resumed from {out / 'checkpoints' / f'step_{CUT:08d}'} (step {CUT}, written by {saved_by} process(es))" \
        in p.stderr, p.stderr[-2000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["resume_step"] == CUT and summary["world_size"] == resumed_by

    # the same steps, and at each the same items, labels, noise and times as both uninterrupted runs
    resumed = global_batches(tmp_path / "batches", resumed_by)
    assert len(resumed) == STEPS - CUT
    for nproc in (1, 2):
        assert resumed == references[nproc][1][CUT:], nproc

    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    before = metrics(source)
    assert rows[:CUT] == before[:CUT]  # written by the saving run, kept as they were
    for nproc in (resumed_by, saved_by):  # the uninterrupted run at the resumed world size, then at the saving one
        for ref, got in zip(metrics(references[nproc][0])[CUT:], rows[CUT:]):
            for key in ("loss", "mse", "grad_norm"):
                assert got[key] == pytest.approx(ref[key], rel=REL), (nproc, ref["step"], key)
    with open(out / "checkpoints" / f"step_{STEPS:08d}" / "meta.json") as f:
        assert json.load(f)["world_size"] == resumed_by
