"""iMF runs through the trainer's plumbing: FSDP2 shards the v-head's blocks per block, 2 processes train a few
iMF steps like 1, and metrics.jsonl logs the v-head's term mse_v (iMF runs only).

The runs start from random weights (tests.meanflow.randomized_train): at init every iMF gate and output layer is
zero, so u = v = 0 and any two runs would agree trivially. Tolerance of the world-size comparison, REL = 1e-5: one
process means the loss over 8 rows, two mean 4 each and average across ranks (gloo), and FSDP2 reduce-scatters the
gradients: fp32 summation orders, measured here at most 6e-8 relative (mse_v; loss, mse and grad_norm came out
bit-equal). The loss itself says little: each adaptive term L / (L + 0.01) is 1 - 5e-6 at this init (L ~ 2000), so
the loss moves by ~1e-7 a step; mse, mse_v and grad_norm move by 0.4-12% a step and carry the comparison.
"""

import json
import os
import sys

import pytest
import torch

from meanflow.models import create_model
from meanflow.parallel import parallelize
from meanflow.trainer.metrics import LogConfig, MetricsLog
from tests.meanflow.cli import cli_env, run

STEPS, REL = 3, 1e-5
IMF_RUN = ["--config", "mnist-imf", "--model.name=iMF-Nano/8", f"--train.steps={STEPS}", "--train.global_batch=8",
           "--train.samples_at_end=0", "--log.sample_every=0", "--log.every=1", "--log.progress=false",
           f"--checkpoint.every={STEPS}", "--checkpoint.keep_last=0"]


def test_fsdp_shards_the_v_head_per_block(process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model = create_model("iMF-Nano/2", input_size=8, in_channels=2, num_classes=3)
    v_params = {id(p) for p in model.v_blocks.parameters()}
    parallelize(model, distributed=True, compute_dtype=torch.float32)
    for blocks in (model.blocks, model.v_blocks):
        assert len(blocks) > 0 and all(isinstance(b, FSDPModule) for b in blocks)
    # the root's own unit holds the embedders and final layers, not the v-head's blocks
    root = model._get_fsdp_state()._fsdp_param_group
    assert v_params.isdisjoint({id(p.sharded_param) for p in root.fsdp_params})
    assert all(isinstance(p, DTensor) for p in model.v_blocks.parameters())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


def train(env, nproc, out):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "tests.meanflow.randomized_train", *IMF_RUN,
           f"--train.out={out}"]
    return run(cmd, env)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_process_imf_run_matches_one_process_and_logs_mse_v(env, tmp_path):
    rows = {}
    for nproc in (1, 2):
        train(env, nproc, tmp_path / f"run{nproc}")
        rows[nproc] = metrics(tmp_path / f"run{nproc}")
    for nproc in (1, 2):
        assert [m["step"] for m in rows[nproc]] == list(range(1, STEPS + 1))
        assert all(m["mse_v"] > 0 for m in rows[nproc])  # the v-head's term, logged for iMF runs
    for a, b in zip(rows[1], rows[2]):
        for key in ("loss", "mse", "mse_v", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=REL), (a["step"], key)
    for key in ("mse", "mse_v", "grad_norm"):  # they move step to step by far more than REL: no trivial match
        values = [m[key] for m in rows[1]]
        assert all(abs(b - a) > 100 * REL * abs(a) for a, b in zip(values, values[1:])), (key, values)


@pytest.mark.parametrize("extra", [{"mse_v": 0.25}, {}], ids=["imf", "meanflow"])
def test_metrics_line_and_progress_bar_carry_mse_v_only_when_given(extra, tmp_path):
    cfg = LogConfig(every=1, progress=True)
    log = MetricsLog(cfg, str(tmp_path), active=True, total=2, start=0, global_batch=4, device=torch.device("cpu"))
    with log:
        log.step_done(1, 1.0, 0.5, 2.0, 1e-3, 0, extra)
        postfix = log.bar.postfix
    row = metrics(tmp_path)[0]
    assert list(row)[:4] == ["step", "loss", "mse", *(["mse_v"] if extra else ["grad_norm"])]
    assert ("mse_v" in row) == bool(extra) and ("mse_v=" in postfix) == bool(extra)
    if extra:
        assert row["mse_v"] == 0.25 and "mse_v=0.2500" in postfix
