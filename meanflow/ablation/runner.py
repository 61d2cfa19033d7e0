"""Running the grid's distinct runs in order, each trained once and evaluated once, with a progress line per run.

Everything a run produces stays in its folder, so a rerun resumes instead of retraining:

    <out>/<kind>/<name>/run/                     the run folder (train.out): config.json, checkpoints/, samples.npz
    <out>/<kind>/<name>/train.log                the trainer's output (eval.log, eval.out: the evaluator's)
    <out>/<kind>/<name>/trained.json             written when training ended: status (done, diverged), seconds, machine
    <out>/<kind>/<name>/result-n<N>-s<1_2>.json  the evaluation at N samples and those step counts, with its seconds

A crash or Ctrl-C loses at most the run in progress, and less: its trainer writes a checkpoint when interrupted and
the rerun resumes from it. A training that diverges (the trainer's "training diverged", exit 2) is recorded as such
and the grid goes on: wrong JVP tangents are expected to diverge.
"""

import json
import os
import shutil
import sys
import time

from meanflow.ablation import evaluation, process
from meanflow.checkpoint import latest_checkpoint, write_json_atomic

TRAINED = "trained.json"
DIVERGED_WORDS = "training diverged"  # meanflow.train's error line for TrainingDiverged


class RunFailed(RuntimeError):
    """A training or an evaluation failed for another reason than divergence: the grid stops."""


class Interrupted(RuntimeError):
    """A trainer exited 75 (preempted): it saved a checkpoint; rerunning the grid resumes it."""


def result_path(home, n, steps) -> str:
    return os.path.join(home, f"result-n{n}-s{'_'.join(map(str, steps))}.json")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def train_out(home) -> str:
    """The run folder the trainer writes (it must hold nothing else), inside the run's home with our records."""
    return os.path.join(home, "run")


def train(run, home) -> dict:
    """Train one run unless its trained.json says it ended; returns that record."""
    done = read_json(os.path.join(home, TRAINED))
    if done is not None and done.get("key") == run.key:
        return done
    os.makedirs(home, exist_ok=True)
    latest = latest_checkpoint(train_out(home)) if os.path.isdir(train_out(home)) else None
    cmd = [sys.executable, "-m", "meanflow.train"] + run.argv(train_out(home))
    log = os.path.join(home, "train.log")
    t0 = time.time()
    status = process.launch(cmd, log, env=process.child_env())
    seconds = time.time() - t0
    with open(log) as f:
        tail = f.read()[-4000:]
    if status == 75:
        raise Interrupted(f"{run.name}: its trainer was stopped and saved a checkpoint; rerun to resume it")
    if status == 2 and DIVERGED_WORDS in tail:
        state = evaluation.DIVERGED
    elif status != 0:
        last = (tail.strip().splitlines() or [""])[-1]
        raise RunFailed(f"training {run.name} exited {status}: {last} (log: {log})")
    else:
        state = "done"
    record = {"key": run.key, "status": state, "seconds": round(seconds, 1), "base": run.base,
              "overrides": {k: str(v) for k, v in run.overrides.items()},
              "resumed_from_step": None if latest is None else latest[0], "machine": process.machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(os.path.join(home, TRAINED), record)
    return record


def evaluate(run, home, n, evaluator, trained, share_dir=None) -> dict:
    """Evaluate one trained run unless a result at (n, steps) exists; returns {"metrics", "seconds", "status"}."""
    path = result_path(home, n, run.eval_steps)
    run_dir = train_out(home)
    done = read_json(path)
    if done is not None:
        return done
    if trained["status"] == evaluation.DIVERGED:
        record = {"status": evaluation.DIVERGED, "metrics": {}, "seconds": 0.0}
    else:
        _share_real_features(share_dir, run_dir, into_run=True)
        t0 = time.time()
        metrics = _jsonable(evaluator(run_dir, run.eval_steps, n))
        seconds = time.time() - t0
        _share_real_features(share_dir, run_dir, into_run=False)
        record = {"status": metrics.get("status", "done"), "metrics": metrics, "seconds": round(seconds, 1)}
    record.update(n=n, steps=list(run.eval_steps))
    write_json_atomic(path, record)
    return record


def _jsonable(metrics) -> dict:
    """The evaluator's dict as plain JSON values (numpy scalars and arrays become floats and lists)."""
    if not isinstance(metrics, dict):
        raise evaluation.EvaluationFailed(f"the evaluator returned {type(metrics).__name__}, not a dict")

    def plain(v):
        return v.tolist() if hasattr(v, "tolist") else str(v)

    return json.loads(json.dumps(metrics, default=plain))


def _share_real_features(share_dir, run_dir, into_run):
    """Every MNIST run reads the same real digits, so their Inception features (meanflow.evaluate's fid_real_<N>.npz
    cache, reused when its data settings match) are computed once and linked into each run folder."""
    if share_dir is None:
        return
    src, dst = (share_dir, run_dir) if into_run else (run_dir, share_dir)
    if not os.path.isdir(src):
        return
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.startswith("fid_real_") and name.endswith(".npz") and not os.path.exists(os.path.join(dst, name)):
            try:
                os.link(os.path.join(src, name), os.path.join(dst, name))
            except OSError:  # another file system: a copy does as well
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def run_all(runs, folder, n, evaluator, say=print, share_dir=None) -> dict:
    """Train and evaluate every run in order; {run.key: {"dir", "trained", "result"}}. Progress: one line as each run
    starts (what, which) and one as it ends (how long, the grid's ETA from the mean time of the runs done)."""
    out, spent, total = {}, [], len(runs)
    todo = sum(1 for r in runs if not _cached(r, os.path.join(folder, r.name), n))
    for i, run in enumerate(runs, 1):
        home = os.path.join(folder, run.name)
        what = f"[{i}/{total}] {run.name}"
        if _cached(run, home, n):
            trained, result = read_json(os.path.join(home, TRAINED)), read_json(result_path(home, n, run.eval_steps))
            say(f"{what}: cached (trained in {fmt_seconds(trained['seconds'])}, evaluated in "
                f"{fmt_seconds(result['seconds'])})")
        else:
            say(f"{what}: training ({'; '.join(run.labels)})")
            t0 = time.time()
            trained = train(run, home)
            say(f"{what}: {'trained' if trained['status'] == 'done' else trained['status']} in "
                f"{fmt_seconds(trained['seconds'])}; evaluating at {','.join(map(str, run.eval_steps))} NFE, n = {n}")
            result = evaluate(run, home, n, evaluator, trained, share_dir)
            spent.append(time.time() - t0)
            todo -= 1
            eta = f"ETA {fmt_seconds(todo * sum(spent) / len(spent))}" if todo else "all done"
            say(f"{what}: evaluated in {fmt_seconds(result['seconds'])}; {todo} run(s) left, {eta}")
        out[run.key] = {"dir": train_out(home), "trained": trained, "result": result}
    return out


def cached(runs, folder, n) -> dict:
    """{run.key: {"dir", "trained", "result"}} of the runs already trained and evaluated at n; nothing is run."""
    out = {}
    for run in runs:
        home = os.path.join(folder, run.name)
        if _cached(run, home, n):
            out[run.key] = {"dir": train_out(home), "trained": read_json(os.path.join(home, TRAINED)),
                            "result": read_json(result_path(home, n, run.eval_steps))}
    return out


def _cached(run, home, n) -> bool:
    trained = read_json(os.path.join(home, TRAINED))
    return (trained is not None and trained.get("key") == run.key
            and read_json(result_path(home, n, run.eval_steps)) is not None)
