"""init_distributed under a hand-made launch environment: the CLI that calls it (meanflow.train) exits 2 with one
line naming the variables, before any process group is joined or anything is written."""

import os
import sys

import pytest

from tests.meanflow.cli import cli_env, run

CASES = {
    "no LOCAL_RANK": ({"WORLD_SIZE": "2", "RANK": "0"}, ["WORLD_SIZE=2", "LOCAL_RANK is not", "torchrun"]),
    "no RANK": ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["WORLD_SIZE=2", "RANK is not", "torchrun"]),
    "WORLD_SIZE alone": ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "RANK and LOCAL_RANK are not"]),
    "not an integer": ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, ["WORLD_SIZE='two'", "integer"]),
    "rank out of range": ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, ["RANK=2", "RANK < WORLD_SIZE"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_incomplete_launch_environment_exits_2_naming_the_variables(case, tmp_path):
    variables, needles = CASES[case]
    env = cli_env(tmp_path / "cache")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(variables)
    out = tmp_path / "run"
    p = run([sys.executable, "-m", "meanflow.train", "--config", "smoke", f"--train.out={out}"], env, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meanflow.train: error: "), p.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not os.path.exists(out)
