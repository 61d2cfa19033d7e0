"""Evaluating one run of the grid: meanflow.evaluate for the MNIST runs, meanflow.toy_eval for the 2-D toys.

MNIST: the Python entry ``meanflow.evaluate.evaluate_run(run, steps=..., n=...)`` where it exists, else the command
line (``python -m meanflow.evaluate --run R --steps 1,2 --n N``, whose last standard output line is one JSON object).
Either gives fid_{k}nfe and real_vs_real_floor; accuracy_{k}nfe, accuracy_per_class_{k}nfe and
classifier_test_accuracy where the evaluator computes them (the report prints "-" where a key is absent).

A model whose samples are not finite is a result ("diverged"), not a failure of the grid: the evaluator's refusal
of non-finite samples is recognised and turned into an empty result.
"""

import importlib
import importlib.util
import inspect
import json
import os
import sys

from meanflow.ablation import process


class EvaluationFailed(RuntimeError):
    """The evaluator failed for a reason other than a diverged model."""


DIVERGED = "diverged"
# how the evaluators refuse NaN/inf samples: meanflow.evaluate "non-finite samples", meanflow.toy_eval "NaN or inf"
NONFINITE = ("non-finite samples", "NaN or inf")


def _nonfinite(message) -> bool:
    return any(words in message for words in NONFINITE)


def evaluate_mnist(run_dir, steps, n) -> dict:
    """Metrics of the run's newest checkpoint at each step count, or {"status": "diverged"}."""
    evaluate = importlib.import_module("meanflow.evaluate")
    entry = getattr(evaluate, "evaluate_run", None)
    if entry is not None:
        # its progress bars would break up the grid's progress lines
        quiet = {"progress": False} if "progress" in inspect.signature(entry).parameters else {}
        try:
            return entry(run_dir, steps=tuple(steps), n=n, **quiet)
        except (ValueError, RuntimeError) as e:  # ConfigError and CheckpointError among them
            if _nonfinite(str(e)):
                return {"status": DIVERGED, "error": str(e)}
            raise EvaluationFailed(f"meanflow.evaluate on {run_dir}: {e}") from None
    return _evaluate_cli(run_dir, steps, n)


def _evaluate_cli(run_dir, steps, n) -> dict:
    home = os.path.dirname(os.path.abspath(run_dir))  # beside the run folder, which the trainer owns
    out, err = os.path.join(home, "eval.out"), os.path.join(home, "eval.log")
    for path in (out, err):  # this attempt's output only: its last line is the answer
        if os.path.exists(path):
            os.remove(path)
    cmd = [sys.executable, "-m", "meanflow.evaluate", "--run", run_dir, "--steps", ",".join(map(str, steps)),
           "--n", str(n)]
    status = process.launch(cmd, out, err, env=process.child_env())
    with open(err) as f:
        last_err = (f.read().strip().splitlines() or [""])[-1]
    if status != 0:
        if _nonfinite(last_err):
            return {"status": DIVERGED, "error": last_err}
        raise EvaluationFailed(f"{' '.join(cmd)} exited {status}: {last_err} (log: {err})")
    return parse_last_json_line(out)


def parse_last_json_line(path) -> dict:
    with open(path) as f:
        lines = f.read().strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise EvaluationFailed(f"{path}: the evaluator's last output line is not a JSON object") from None
    if not isinstance(result, dict):
        raise EvaluationFailed(f"{path}: the evaluator's last output line is not a JSON object")
    return result


def toy_evaluator_missing() -> str | None:
    """Why the 2-D toy section cannot run here (a missing module or preset), or None."""
    from meanflow.ablation.toys import TOY_PRESETS
    from meanflow.config import PRESETS

    missing = [p for p in TOY_PRESETS if p not in PRESETS]
    if importlib.util.find_spec("meanflow.toy_eval") is None:
        return "meanflow.toy_eval is not in this checkout"
    if missing:
        return f"the presets {', '.join(missing)} are not in this checkout"
    return None


def evaluate_toy(run_dir, steps, n) -> dict:
    """meanflow.toy_eval.evaluate_toy: swd_{k}nfe, energy_{k}nfe, swd_floor, energy_floor, n."""
    toy_eval = importlib.import_module("meanflow.toy_eval")
    try:
        return toy_eval.evaluate_toy(run_dir, steps=tuple(steps), n=n)
    except (ValueError, RuntimeError) as e:  # ConfigError and CheckpointError among them
        if _nonfinite(str(e)):
            return {"status": DIVERGED, "error": str(e)}
        raise EvaluationFailed(f"meanflow.toy_eval on {run_dir}: {e}") from None
