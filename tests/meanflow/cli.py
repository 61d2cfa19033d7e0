"""Running the command-line entry points in subprocesses, as a user would."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli_env(cache_dir):
    """The environment for CLI subprocesses: a private MNIST cache, the repo importable, one thread per process,
    and the torch backend (no Triton interpreter) so they run at CPU speed."""
    e = dict(os.environ)
    e["MEANFLOW_CACHE"] = str(cache_dir)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("TRITON_INTERPRET", None)
    return e


def run(cmd, env, check=True):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p
