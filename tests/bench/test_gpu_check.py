"""make gpu-check (bench.gpu_check) on a machine without CUDA, and the parts of it that need no GPU: the output
folder policy, the budget enforcement, the loss comparison. The subprocesses hide any GPU (CUDA_VISIBLE_DEVICES=""),
so these tests mean the same on a GPU machine."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from bench import gpu_check

REPO = str(gpu_check.REPO)
NO_CUDA_LINE = "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing run"


def _no_gpu_env(out):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPU_CHECK_OUT=str(out))
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_gpu_check_without_cuda_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "x"
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, env=_no_gpu_env(out),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert (p.stdout + p.stderr).splitlines() == [NO_CUDA_LINE]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_without_cuda_needs_no_venv_and_writes_nothing(tmp_path):
    """The Makefile target calls the module with GPU_PYTHON and GPU_CHECK_OUT, and installs nothing first."""
    out = tmp_path / "x"
    p = subprocess.run(["make", "-s", "--no-print-directory", "gpu-check", f"GPU_PYTHON={sys.executable}",
                        f"GPU_CHECK_OUT={out}", f"VENV={tmp_path / 'venv'}"], cwd=REPO, env=_no_gpu_env(out),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.splitlines()[0] == NO_CUDA_LINE  # then make's own "Error 2" line
    assert list(tmp_path.iterdir()) == []  # no output folder, and no venv made for it


def test_output_folder_policy_never_touches_what_gpu_check_did_not_write(tmp_path):
    new = tmp_path / "new" / "out"
    gpu_check.claim_out_dir(new)
    assert [p.name for p in new.iterdir()] == [gpu_check.MARKER]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(gpu_check.Refused, match="not a gpu-check folder"):
        gpu_check.claim_out_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"

    user_data = tmp_path / "user-data"
    user_data.mkdir()
    (user_data / "keep.npy").write_text("x")
    previous = tmp_path / "previous"
    for name in ("logs", "train-torch"):
        (previous / name).mkdir(parents=True)
        (previous / name / "f").write_text("old")
    (previous / gpu_check.MARKER).write_text("{}")
    (previous / "summary.json").write_text("{}")
    (previous / "data").symlink_to(user_data)  # a link in our folder: removed, what it points to is not
    (previous / "extra").write_text("mine")
    with pytest.raises(gpu_check.Refused, match="extra"):
        gpu_check.claim_out_dir(previous)
    assert (previous / "logs" / "f").exists()  # refused before anything was removed

    (previous / "extra").unlink()
    gpu_check.claim_out_dir(previous)
    assert [p.name for p in previous.iterdir()] == [gpu_check.MARKER]
    assert (user_data / "keep.npy").read_text() == "x"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(gpu_check.Refused, match="not a folder"):
        gpu_check.claim_out_dir(a_file)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_a_step_over_budget_is_stopped_and_recorded(tmp_path):
    (tmp_path / "logs").mkdir()
    slow = gpu_check.Step("slow", 1, "")
    gpu_check.run_command(slow, ["sh", "-c", "echo started; sleep 30"], tmp_path, dict(os.environ))
    assert slow.status == "timeout" and slow.returncode == 124 and 1 <= slow.elapsed_s < 10
    assert (tmp_path / "logs" / "slow.log").read_text() == "started\n"
    failing = gpu_check.Step("failing", 10, "")
    gpu_check.run_command(failing, ["sh", "-c", "echo '1 failed'; exit 3"], tmp_path, dict(os.environ))
    assert failing.status == "failed" and failing.detail == "exit 3: 1 failed"


def test_budgets_add_up_to_at_most_8_minutes_and_every_step_runs_something():
    assert gpu_check.TOTAL_BUDGET_S == sum(s.budget_s for s in gpu_check.STEPS) <= 8 * 60
    steps = {s.name: s for s in gpu_check.STEPS}
    assert set(gpu_check.step_functions(steps, {})) == set(steps)


def _metrics(path, mse_scale=1.0, nan_at=None, steps=gpu_check.TRAIN_STEPS):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": 0.99, "mse": mse_scale * (2.0 - s / steps), "grad_norm": 0.5, "skipped_steps": 0}
            for s in range(1, steps + 1)]
    if nan_at is not None:
        rows[nan_at - 1]["loss"] = math.nan
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_runs_holds_the_kernel_run_to_the_torch_run(tmp_path):
    ref = _metrics(tmp_path / "torch" / "metrics.jsonl")
    ok, result, _ = gpu_check.compare_runs(_metrics(tmp_path / "close" / "metrics.jsonl", 1.01), ref)
    assert ok and result["rel_diff"]["mse"] == pytest.approx(0.01) and result["window"] == [21, 30]
    ok, _, problems = gpu_check.compare_runs(_metrics(tmp_path / "far" / "metrics.jsonl", 1.2), ref)
    assert not ok and "mean mse over steps 21-30" in problems[0] and "20.00% apart" in problems[0]
    ok, _, problems = gpu_check.compare_runs(_metrics(tmp_path / "nan" / "metrics.jsonl", nan_at=3), ref)
    assert not ok and "non-finite" in problems[0] and "[3]" in problems[0]
    ok, _, problems = gpu_check.compare_runs(_metrics(tmp_path / "short" / "metrics.jsonl", steps=20), ref)
    assert not ok and "no row for step(s) [21" in problems[0]
