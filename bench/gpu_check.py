"""`make gpu-check`: validate a GPU machine in under 8 minutes, with every result in one folder.

    make gpu-check [GPU_CHECK_OUT=runs/gpu-check] [GPU_PYTHON=python3]
    GPU_CHECK_OUT=DIR python3 -m bench.gpu_check          # the same, from the repository root

Made for a machine with one H100/H200 on which torch and triton are preinstalled and nothing can be installed: no
venv, no pip, no network. The project runs from this checkout (PYTHONPATH) under the interpreter that runs this
module, and every child process gets TRITON_INTERPRET=0 (the real kernels, never the interpreter).

The steps, in order, each under the budget printed at the start (STEPS below; the budgets add up to 470 s). A
command that overruns its budget is stopped by coreutils `timeout` (SIGTERM, SIGKILL 30 s later) and recorded as
"timeout"; the next step still runs. A step whose input is missing (the data, a run) is "skipped".

  prepare-data       a synthetic latent data folder in the layout meanflow.data reads (class folders of .npy)
  tests              the CUDA tier: pytest tests/mfkernels tests/meanflow/test_kernels_in_model.py
  tests-marked-cuda  tests elsewhere marked `cuda` or `gpu`, when pytest.ini registers such a marker
  bench-attention    bench/test_attention.py --gpu-check: N in {256, 1024, 4096}, D in {64, 72}, bf16
  bench-adaln        bench/test_adaln.py --gpu-check: C in {768, 1152} (DiT-B/2, XL/2), 256 tokens, bf16
  bench-train-step   bench/test_train_step.py --gpu-check: DiT-B/2 batch 64 bf16, dual+kernels vs func vs flow
                     matching (a failing func is recorded); DiT-XL/2 batch 64 dual+kernels time and peak memory
  bench-report       the three suites' JSON merged into bench.json, and bench.md rendered by bench.report
  train-triton       torchrun (python -m torch.distributed.run --standalone --nproc_per_node=1 -m meanflow.train):
                     30 steps of the imagenet-B2 preset (DiT-B/2, 32x32x4 latents, 1000 classes), batch 64, bf16,
                     FSDP2 (the trainer shards whenever torchrun started it), --train.compile=true, Triton kernels
  train-torch        the same run with MFKERNELS_BACKEND=torch
  compare            both runs finite; the kernel run's loss curve within tolerance of the torch run's (compare_runs)

The output folder (GPU_CHECK_OUT, default runs/gpu-check):
  summary.json, summary.md       step, budget, elapsed, status, detail; the loss comparison
  logs/<step>.log                the exact output (stdout and stderr) of each step's command
  tests/<step>.xml               junit reports of the test steps
  bench/<suite>.json             pytest-benchmark JSON per suite; bench.json (merged) and bench.md (its tables):
                                 python3 -m bench.report OUT/bench.json --update BENCHMARKS.md records them
  data/, train-triton/, train-torch/   the synthetic latents and the two run folders
  .gpu-check                     marks the folder as written by gpu-check
The folder must be new, empty, or a previous gpu-check folder (whose results are then replaced); anything else is
refused before anything is written, so user data is never touched.

Exit status: 0 every step passed; 1 a step failed or timed out; 2 nothing was run (no CUDA device, an output folder
that is not gpu-check's, no `timeout` command); 130 interrupted.
"""

import configparser
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "runs/gpu-check"
MARKER = ".gpu-check"
OWNED = {MARKER, "summary.json", "summary.md", "logs", "tests", "bench", "bench.json", "bench.md", "data",
         "train-triton", "train-torch"}  # everything gpu-check writes at the top of its folder
KILL_AFTER_S = 30  # torchrun needs a moment after SIGTERM to stop its workers (they run in their own sessions)

CUDA_TESTS = ["tests/mfkernels", "tests/meanflow/test_kernels_in_model.py"]
CUDA_MARKERS = ("cuda", "gpu")
BENCH_SUITES = {"attention": "bench/test_attention.py", "adaln": "bench/test_adaln.py",
                "train-step": "bench/test_train_step.py"}

# The training runs. The data: 16 class folders of 16 latents (4, 32, 32), float32; raw std 1 / 0.18215 so that the
# preset's data.scale brings them to about unit variance, like SD-VAE latents. 256 items = 4 steps per epoch.
TRAIN_STEPS, TRAIN_BATCH = 30, 64
DATA_CLASSES, DATA_PER_CLASS, LATENT_STD = 16, 16, 1 / 0.18215
RUNS = {"train-triton": "triton", "train-torch": "torch"}  # run folder: MFKERNELS_BACKEND

# The loss comparison. Both runs start from the same weights, read the same batches and draw the same per-step
# randomness (all seeded by train.seed); they differ only in how bf16 rounds inside attention and adaLN (the kernels
# accumulate in fp32 in one pass, the torch ops round between ops), so they are not step-exact and we compare the
# mean over the last COMPARE_LAST steps. Expected: well under 1% apart after 30 steps at lr 1e-4 (the trajectories
# barely separate); COMPARE_RTOL = 5% leaves room for rounding while a wrong primal or gradient shows up as a level
# shift or a non-finite value. Two limits to keep in mind: with the preset's adaptive weighting (p = 1) the logged
# loss is L / (L + c) ~ 1 and says little, so the per-element mse is compared as well (it is the informative curve);
# and 30 steps from adaLN-Zero's init move the weights little, so this is a smoke test of the full GPU path (FSDP2,
# compile, kernels, bf16), not a precision test: tests/mfkernels is.
COMPARE_LAST, COMPARE_RTOL = 10, 0.05


@dataclass
class Step:
    name: str
    budget_s: int
    what: str
    status: str = "not run"  # ok, failed, timeout, skipped, interrupted, not run
    elapsed_s: float = 0.0
    detail: str = ""
    returncode: int | None = None
    command: list | None = None
    log: str | None = None


STEPS = [
    Step("prepare-data", 5, f"synthetic latents: {DATA_CLASSES} classes x {DATA_PER_CLASS} items of (4, 32, 32)"),
    Step("tests", 100, "pytest " + " ".join(CUDA_TESTS)),
    Step("tests-marked-cuda", 15, f"pytest -m '{' or '.join(CUDA_MARKERS)}' on the rest of tests/, if registered"),
    Step("bench-attention", 80, "attention fwd and fwd+tangent, N 256/1024/4096 x D 64/72, bf16"),
    Step("bench-adaln", 20, "adaLN dual op, C 768/1152, 256 tokens, bf16"),
    Step("bench-train-step", 60, "DiT-B/2 b64 dual+kernels vs func vs flow matching; DiT-XL/2 b64 dual+kernels"),
    Step("bench-report", 5, "bench.json (merged) and bench.md (bench.report)"),
    Step("train-triton", 90, f"torchrun 1 GPU, DiT-B/2 {TRAIN_STEPS} steps b{TRAIN_BATCH} bf16 FSDP2 compile, kernels"),
    Step("train-torch", 90, "the same run with MFKERNELS_BACKEND=torch"),
    Step("compare", 5, f"finite losses; last-{COMPARE_LAST}-step means within {COMPARE_RTOL:.0%}"),
]
TOTAL_BUDGET_S = sum(s.budget_s for s in STEPS)


class Refused(Exception):
    """gpu-check cannot start; nothing was written."""


class Skip(Exception):
    """A step whose input is missing, or that does not apply here."""


class CheckFailed(Exception):
    """An in-process step found what it checks to be wrong; the message says what."""


# ----------------------------------------------------------------------------------------------------------------------
# before anything is written
# ----------------------------------------------------------------------------------------------------------------------

def cuda_problem():
    """None when a CUDA device is usable, else the one line saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch

            available = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001 (a broken torch install is reported, whatever it raises)
        return f"gpu-check: cannot import torch with {sys.executable} ({type(e).__name__}: {e}); nothing run"
    if not available:
        return "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing run"
    return None


def claim_out_dir(out: Path):
    """Make ``out`` an empty gpu-check folder, or raise Refused having changed nothing. A new or empty folder is
    used as is; a previous gpu-check folder (it holds the marker and only what gpu-check writes) is emptied."""
    if os.path.lexists(out) and not out.is_dir():
        raise Refused(f"gpu-check: GPU_CHECK_OUT={out} exists and is not a folder; nothing run")
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    if entries and MARKER not in entries:
        raise Refused(f"gpu-check: GPU_CHECK_OUT={out} is not empty and is not a gpu-check folder (no {MARKER} "
                      "file); gpu-check writes only into a new or empty folder or over a previous gpu-check's "
                      "results: choose another GPU_CHECK_OUT; nothing run")
    foreign = [e for e in entries if e not in OWNED]
    if foreign:
        raise Refused(f"gpu-check: GPU_CHECK_OUT={out} is a previous gpu-check folder but also holds "
                      f"{', '.join(foreign[:5])}, which gpu-check did not write: move them or choose another "
                      "GPU_CHECK_OUT; nothing run")
    for name in entries:  # only names from OWNED, checked above
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"written_by": "python -m bench.gpu_check",
                                          "started": datetime.now().isoformat(timespec="seconds")}) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# running steps
# ----------------------------------------------------------------------------------------------------------------------

def child_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TRITON_INTERPRET"] = "0"  # the kernels on CUDA tensors, never the interpreter
    env["PYTHONUNBUFFERED"] = "1"  # a log is complete up to the moment its step is stopped
    env.pop("MFKERNELS_BACKEND", None)  # the steps that care set it themselves
    env.update(extra)
    return env


def _last_line(path):
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_command(step, cmd, out, env, ok_codes=(0,)):
    """Run ``cmd`` under `timeout` with the step's budget, its output going to logs/<step>.log."""
    log = out / "logs" / f"{step.name}.log"
    step.command, step.log = list(cmd), str(log.relative_to(out))
    start = time.monotonic()
    with open(log, "wb") as fh:
        # timeout runs the command in its own process group and signals the whole group when the budget is spent
        proc = subprocess.Popen(["timeout", f"--kill-after={KILL_AFTER_S}", str(step.budget_s), *cmd], cwd=REPO,
                                env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches us, not timeout's process group: pass it on, then stop
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(KILL_AFTER_S + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    step.elapsed_s, step.returncode = time.monotonic() - start, rc
    # 124: stopped by SIGTERM; 137 or -9: the SIGKILL that follows (it may also reach timeout, in the same group)
    if rc in (124, 128 + signal.SIGKILL, -signal.SIGKILL) and step.elapsed_s >= step.budget_s - 1:
        step.status = "timeout"
        step.detail = f"stopped after its {step.budget_s} s budget; last output: {_last_line(log)}"
    elif rc in ok_codes:
        step.status, step.detail = "ok", _last_line(log)
    else:
        step.status, step.detail = "failed", f"exit {rc}: {_last_line(log)}"


def write_latents(root: Path, classes=DATA_CLASSES, per_class=DATA_PER_CLASS, seed=0):
    """The npy layout of meanflow.data: root/<class>/<item>.npy, float32 (4, 32, 32); a mean per class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        center = rng.normal(0.0, 2.0, size=(4, 1, 1))
        for i in range(per_class):
            x = center + LATENT_STD * rng.standard_normal((4, 32, 32))  # (C, H, W)
            np.save(folder / f"{i:03d}.npy", x.astype(np.float32))
    return classes * per_class


def merge_bench(paths):
    """One pytest-benchmark JSON of several runs: the first run's machine and commit info, all the benchmarks."""
    runs = [json.loads(p.read_text()) for p in paths]
    merged = dict(runs[0])
    merged["benchmarks"] = [b for run in runs for b in run.get("benchmarks", [])]
    return merged


def read_metrics(path):
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return {row["step"]: row for row in rows}


def compare_runs(kernel_metrics, torch_metrics, steps=TRAIN_STEPS, last=COMPARE_LAST, rtol=COMPARE_RTOL):
    """(ok, result, problems) for two runs' metrics.jsonl; see COMPARE_RTOL for the tolerance and why."""
    runs = {"kernels": read_metrics(kernel_metrics), "torch": read_metrics(torch_metrics)}
    problems, means = [], {}
    window = range(steps - last + 1, steps + 1)
    for name, rows in runs.items():
        missing = [s for s in range(1, steps + 1) if s not in rows]
        if missing:
            problems.append(f"{name} run: metrics.jsonl has no row for step(s) {missing[:5]}")
            continue
        bad = [s for s in range(1, steps + 1) for k in ("loss", "mse", "grad_norm")
               if not math.isfinite(rows[s][k])]
        if bad or rows[steps].get("skipped_steps", 0):
            problems.append(f"{name} run: non-finite loss, mse or grad norm at step(s) {sorted(set(bad))[:5]} "
                            f"({rows[steps].get('skipped_steps', 0)} steps skipped)")
            continue
        means[name] = {k: sum(rows[s][k] for s in window) / last for k in ("loss", "mse", "grad_norm")}
    result = {"steps": steps, "window": [window.start, window.stop - 1], "rtol": rtol, "means": means}
    if len(means) == 2:
        rel = {k: abs(means["kernels"][k] - means["torch"][k]) / max(abs(means["torch"][k]), 1e-30)
               for k in ("loss", "mse", "grad_norm")}
        result["rel_diff"] = rel
        for k in ("loss", "mse"):  # grad_norm is reported, not checked: no measured bf16 spread to hold it to yet
            if rel[k] > rtol:
                problems.append(f"mean {k} over steps {window.start}-{window.stop - 1}: kernels "
                                f"{means['kernels'][k]:.6g} vs torch {means['torch'][k]:.6g}, {rel[k]:.2%} apart "
                                f"(tolerance {rtol:.0%})")
    result["problems"] = problems
    return not problems, result, problems


# ----------------------------------------------------------------------------------------------------------------------
# the steps: each either runs a command (run_command sets its status) or works in process and returns its detail
# ----------------------------------------------------------------------------------------------------------------------

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]  # no .pytest_cache in the checkout


def registered_markers():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "pytest.ini")
    text = ini.get("pytest", "markers", fallback="")
    return {line.split(":", 1)[0].strip() for line in text.splitlines() if line.strip()}


def _tests(step, out):
    # the native library is an optional CPU kernel: its tests skip rather than fail where it was not built
    env = child_env(MFKERNELS_REQUIRE_NATIVE=os.environ.get("MFKERNELS_REQUIRE_NATIVE", "0"))
    run_command(step, PYTEST + CUDA_TESTS + [f"--junitxml={out / 'tests' / 'tests.xml'}"], out, env)


def _tests_marked(step, out):
    markers = [m for m in CUDA_MARKERS if m in registered_markers()]
    if not markers:
        raise Skip(f"pytest.ini registers no {' or '.join(CUDA_MARKERS)} marker")
    cmd = PYTEST + ["-m", " or ".join(markers), "tests", *(f"--ignore={p}" for p in CUDA_TESTS),
                    f"--junitxml={out / 'tests' / 'tests-marked-cuda.xml'}"]
    env = child_env(MFKERNELS_REQUIRE_NATIVE=os.environ.get("MFKERNELS_REQUIRE_NATIVE", "0"))
    run_command(step, cmd, out, env, ok_codes=(0, 5))  # 5: no test outside the CUDA tier carries the marker


def _bench(suite):
    def run(step, out):
        cmd = PYTEST + [BENCH_SUITES[suite], "--benchmark", "--gpu-check",
                        f"--benchmark-json={out / 'bench' / f'{suite}.json'}"]
        run_command(step, cmd, out, child_env())

    return run


def _bench_report(step, out):
    from bench import report

    paths = [out / "bench" / f"{suite}.json" for suite in BENCH_SUITES]
    found = [p for p in paths if p.is_file()]
    if not found:
        raise CheckFailed("no benchmark JSON was written (see the bench-* logs)")
    merged = merge_bench(found)
    (out / "bench.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "bench.md").write_text(report.render(merged) + "\n")
    missing = [p.stem for p in paths if p not in found]
    return (f"{len(merged['benchmarks'])} benchmarks in bench.json, tables in bench.md"
            + (f"; no results from {', '.join(missing)}" if missing else ""))


def train_args(out, run):
    return ["--config", "imagenet-B2", f"--data.root={out / 'data'}", "--data.loader=torch",
            f"--train.steps={TRAIN_STEPS}", f"--train.global_batch={TRAIN_BATCH}", "--train.precision=bf16",
            "--train.compile=true", f"--train.out={out / run}", "--train.samples_at_end=0", "--log.every=1",
            "--log.progress=false"]


def _train(run, steps):
    def fn(step, out):
        if steps["prepare-data"].status != "ok":
            raise Skip("no data: prepare-data did not pass")
        # torchrun is this module of the same interpreter; under it the trainer joins a process group and shards
        # the model with FSDP2 (meanflow.parallel.parallelize(distributed=True))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "meanflow.train", *train_args(out, run)]
        run_command(step, cmd, out, child_env(MFKERNELS_BACKEND=RUNS[run]))

    return fn


def _compare(steps, results):
    def fn(step, out):
        not_ok = [name for name in RUNS if steps[name].status != "ok"]
        if not_ok:
            raise Skip(f"{' and '.join(not_ok)} did not pass")
        kernels, reference = (out / name / "metrics.jsonl" for name in RUNS)
        ok, result, problems = compare_runs(kernels, reference)
        results["compare"] = result
        if not ok:
            raise CheckFailed("; ".join(problems))
        m, rel = result["means"], result["rel_diff"]
        return (f"mean mse over steps {result['window'][0]}-{result['window'][1]}: kernels {m['kernels']['mse']:.5g}, "
                f"torch {m['torch']['mse']:.5g} ({rel['mse']:.2%} apart); loss {rel['loss']:.2%} apart; "
                f"grad norm {rel['grad_norm']:.2%} apart (reported only)")

    return fn


def step_functions(steps, results):
    return {
        "prepare-data": lambda step, out: f"{write_latents(out / 'data')} items in data/",
        "tests": _tests,
        "tests-marked-cuda": _tests_marked,
        "bench-attention": _bench("attention"),
        "bench-adaln": _bench("adaln"),
        "bench-train-step": _bench("train-step"),
        "bench-report": _bench_report,
        "train-triton": _train("train-triton", steps),
        "train-torch": _train("train-torch", steps),
        "compare": _compare(steps, results),
    }


def run_step(step, fn, out):
    start = time.monotonic()
    try:
        detail = fn(step, out)
        if step.status == "not run":  # worked in process
            step.status, step.detail = "ok", detail or ""
    except Skip as e:
        step.status, step.detail = "skipped", str(e)
    except CheckFailed as e:
        step.status, step.detail = "failed", str(e)
    except KeyboardInterrupt:
        step.status = "interrupted"
        raise
    except Exception as e:  # noqa: BLE001 (an in-process step's error is its result; the next steps still run)
        step.status, step.detail = "failed", f"{type(e).__name__}: {e}"
    finally:
        if step.returncode is None:  # no command finished: the step's time is its own
            step.elapsed_s = time.monotonic() - start
            if step.elapsed_s > step.budget_s and step.status == "ok":
                step.detail += f" (over its {step.budget_s} s budget: an in-process step is not stopped)"
        if step.log is None:  # no command ran: the log is what the step found
            step.log = f"logs/{step.name}.log"
            (out / step.log).write_text(f"{step.status}: {step.detail}\n")


# ----------------------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------------------

def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(out):
    """Device, versions and commit: from the benchmarks' JSON when they wrote one (it names the device)."""
    try:
        env = dict(json.loads((out / "bench.json").read_text())["machine_info"]["meanflow"])
    except (OSError, KeyError, ValueError):
        env = {}
    if "torch" not in env:
        import torch

        env["torch"] = torch.__version__
    if "triton" not in env:
        from importlib import metadata

        try:
            env["triton"] = metadata.version("triton")
        except metadata.PackageNotFoundError:
            env["triton"] = "not installed"
    env.setdefault("device", "CUDA device (name not recorded: no benchmark JSON)")
    env.setdefault("commit", _git("rev-parse", "--short=12", "HEAD"))
    return env


def passed(steps):
    return all(s.status in ("ok", "skipped") for s in steps)


def write_summary(out, steps, started, results):
    summary = {
        "ok": passed(steps),
        "started": started,
        "updated": datetime.now().isoformat(timespec="seconds"),
        "out": str(out),
        "python": sys.executable,
        "environment": environment(out),
        "total_budget_s": sum(s.budget_s for s in steps),
        "total_elapsed_s": round(sum(s.elapsed_s for s in steps), 1),
        "steps": [asdict(s) for s in steps],
        "compare": results.get("compare"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, steps))
    return summary


def _cell(text):
    return str(text).replace("|", "/").replace("\n", " ")


def _verdict(steps):
    bad = [f"{s.name} ({s.status})" for s in steps if s.status not in ("ok", "skipped")]
    return f"all {len(steps)} steps passed" if not bad else f"did not pass: {', '.join(bad)}"


def summary_markdown(summary, steps):
    env = summary["environment"]
    lines = [f"# gpu-check: {env['device']}, {summary['started'][:10]}", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env.get('commit') or '?'}. "
             f"Result: {_verdict(steps)}. Elapsed {summary['total_elapsed_s']:.0f} s of a "
             f"{summary['total_budget_s']} s budget.", "",
             "| step | budget (s) | elapsed (s) | status | detail |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.budget_s} | {s.elapsed_s:.1f} | {s.status} | {_cell(s.detail)} |" for s in steps]
    cmp = summary.get("compare")
    if cmp and len(cmp.get("means", {})) == 2:
        m, rel = cmp["means"], cmp["rel_diff"]
        lines += ["", f"## Kernels vs torch ops: mean over steps {cmp['window'][0]}-{cmp['window'][1]}", "",
                  "| metric | train-triton | train-torch | apart | checked |", "|---|---|---|---|---|"]
        checked = {"loss": f"<= {cmp['rtol']:.0%}", "mse": f"<= {cmp['rtol']:.0%}", "grad_norm": "reported only"}
        lines += [f"| {k} | {m['kernels'][k]:.6g} | {m['torch'][k]:.6g} | {rel[k]:.2%} | {checked[k]} |"
                  for k in checked]
    lines += ["", "## Files", "",
              "- `logs/<step>.log`: the exact output of each step's command; `tests/*.xml`: junit reports",
              "- `bench.md`: the benchmark tables; record them with "
              f"`python3 -m bench.report {summary['out']}/bench.json --update BENCHMARKS.md`",
              "- `train-triton/`, `train-torch/`: the run folders (config.json, metrics.jsonl, checkpoints/)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------

def _minutes(seconds):
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv:
        print(f"gpu-check: takes no arguments (set GPU_CHECK_OUT and GPU_PYTHON), got {' '.join(argv)}; nothing run",
              file=sys.stderr)
        return 2
    problem = cuda_problem()
    if problem is None and shutil.which("timeout") is None:
        problem = "gpu-check: the `timeout` command (GNU coreutils) is not on PATH; nothing run"
    out = Path(os.environ.get("GPU_CHECK_OUT") or DEFAULT_OUT).expanduser().absolute()
    if problem is None:
        try:
            claim_out_dir(out)
        except Refused as e:
            problem = str(e)
        except OSError as e:
            problem = f"gpu-check: cannot prepare GPU_CHECK_OUT={out}: {e}"
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2

    for sub in ("logs", "tests", "bench"):
        (out / sub).mkdir()
    steps = [replace(s) for s in STEPS]
    by_name, results = {s.name: s for s in steps}, {}
    functions = step_functions(by_name, results)
    started = datetime.now().isoformat(timespec="seconds")
    total = sum(s.budget_s for s in steps)
    print(f"gpu-check: {len(steps)} steps, total budget {total} s ({_minutes(total)}), results in {out}", flush=True)
    for i, s in enumerate(steps, 1):
        print(f"  {i:2d}. {s.name:<18} {s.budget_s:4d} s  {s.what}", flush=True)
    interrupted = False
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name}: started, budget {step.budget_s} s", flush=True)
        try:
            run_step(step, functions[step.name], out)
        except KeyboardInterrupt:
            interrupted = True
        line = f"[{i}/{len(steps)}] {step.name}: {step.status} in {step.elapsed_s:.1f} s (budget {step.budget_s} s)"
        print(line + (f": {step.detail}" if step.status != "ok" and step.detail else ""), flush=True)
        write_summary(out, steps, started, results)
        if interrupted:
            break
    summary = write_summary(out, steps, started, results)
    print(f"gpu-check: {_verdict(steps)}; {summary['total_elapsed_s']:.0f} s of a {total} s budget", flush=True)
    print(f"  summary:    {out / 'summary.md'} (and summary.json)")
    print(f"  logs:       {out / 'logs'}/")
    print(f"  benchmarks: {out / 'bench.md'}; record them with")
    print(f"              python3 -m bench.report {out / 'bench.json'} --update BENCHMARKS.md")
    print(f"  runs:       {out / 'train-triton'}, {out / 'train-torch'}", flush=True)
    if interrupted:
        return 130
    return 0 if passed(steps) else 1


if __name__ == "__main__":
    sys.exit(main())
