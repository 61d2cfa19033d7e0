"""Child processes of the grid and the machine they run on.

Each training runs as its own ``python -m meanflow.train`` process (one process, no torchrun: the runs are small and
the machine's cores are better spent on one run at a time), its output in a log file of the run folder. Ctrl-C
reaches the child too (same process group): the trainer finishes its step, writes a checkpoint and exits 75, so the
grid waits for it before stopping, and the next invocation resumes that run from the checkpoint.
"""

import os
import platform
import signal
import subprocess

import torch

SAVE_GRACE_S = 300  # how long an interrupted child may take to write its checkpoint before it is killed


def launch(cmd, stdout_path, stderr_path=None, env=None) -> int:
    """Run cmd with its output appended to files (stderr to stdout's file unless stderr_path); its exit status."""
    with open(stdout_path, "a") as out, open(stderr_path or os.devnull, "a") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err if stderr_path else subprocess.STDOUT, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # A terminal's Ctrl-C reached the child already; a SIGTERM to us did not, so pass one on (the trainer
            # takes a second signal within 2 s of the first as the same one).
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=SAVE_GRACE_S)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            raise


def machine() -> dict:
    """What the doc states a run ran on: CPU model, logical cores, torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def child_env() -> dict:
    """The trainer's environment: ours, with this checkout importable first (the grid may run from elsewhere)."""
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env
