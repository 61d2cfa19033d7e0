"""Golden losses: the smoke run repeats its stored per-step loss, mse and grad_norm to 1e-5 relative.

    python -m tests.meanflow.test_golden --regenerate    # rewrites tests/meanflow/golden/smoke_losses.json

The run: ``python -m tests.meanflow.randomized_train --config smoke`` (6 steps, fp32, one process, CPU) with one
thread (OMP_NUM_THREADS=1 from tests.meanflow.cli.cli_env). Regenerate only for a change meant to move the numbers
(the objective, the step's random draws, the smoke preset, the model's layers) and say so in the commit; a change
meant to keep them (a refactor of the trainer, a kernel swap) must pass as is.

From random weights, not the plain run: DiT's adaLN-Zero init makes u and du/dt exactly 0 at step 1 and gives the
blocks no gradient until their gates have moved, so the plain run's first steps check little of the model, the
tangent or the objective. From random weights every step depends on all of them.

Why 1e-5: on this CPU the run repeats bit for bit (three runs, one thread; two threads give the same bits too), and
the same run on 2 processes, whose all-reduce sums in another order, moves the numbers by at most 4.2e-7, and the
torch adaLN path instead of the native kernel (MFKERNELS_NATIVE=0) by 2.2e-7. So 1e-5 leaves room for another
summation order (another CPU, a torch update) while a lost du/dt (--zero-dudt: 1.7e-3 on the loss at step 1) fails.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.meanflow.cli import cli_env, run

GOLDEN = Path(__file__).with_name("golden") / "smoke_losses.json"
ENTRY = ["-m", "tests.meanflow.randomized_train", "--config", "smoke"]
KEYS = ("loss", "mse", "grad_norm")


def smoke_losses(workdir):
    """Run the smoke run in a subprocess and return its logged rows, trimmed to step and KEYS."""
    out = os.path.join(workdir, "run")
    run([sys.executable, *ENTRY, f"--train.out={out}"], cli_env(os.path.join(workdir, "cache")))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in rows]


def test_smoke_run_repeats_the_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())["steps"]
    got = smoke_losses(str(tmp_path))
    assert [r["step"] for r in got] == [r["step"] for r in golden] == list(range(1, 7))
    for want, have in zip(golden, got):
        for key in KEYS:
            assert have[key] == pytest.approx(want[key], rel=1e-5), (want["step"], key)


def regenerate():
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        steps = smoke_losses(tmp)
    GOLDEN.parent.mkdir(exist_ok=True)
    lines = ",\n".join(f"  {json.dumps(row)}" for row in steps)  # one step per line
    GOLDEN.write_text(f'{{"command": {json.dumps(" ".join(["OMP_NUM_THREADS=1 python", *ENTRY]))},\n'
                      f' "torch": {json.dumps(torch.__version__)},\n "steps": [\n{lines}\n ]}}\n')
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.meanflow.test_golden --regenerate")
    regenerate()
