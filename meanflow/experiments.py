"""The MeanFlow paper's Table 1 at small scale: a fixed-budget grid of short trainings on the embedded MNIST, each
evaluated, written up as docs/ablations.md with figures under docs/ablations/.

    python -m meanflow.experiments ablations [--base mnist-demo] [--steps N] [--n 300] [--no-toys]
    python -m meanflow.experiments toys      [--toy-steps N] [--toy-n 2000]   # the 2-D toy section alone
    python -m meanflow.experiments ablations --quick --base smoke             # a test-sized grid, seconds a run
    python -m meanflow.experiments ablations --dry-run                        # the distinct runs, nothing trained

The grid (meanflow.ablation.grid): JVP tangents (v,0,1) (v,0,0) (v,1,0) (v,1,1); ratio of r != t 0/25/50/100%;
adaptive weight p 0/0.5/1; guidance w 1/2/3; flow matching at 1 and 50 steps. Rows with the same settings share one
run: 11 distinct runs, each `python -m meanflow.train` in one process, then meanflow.evaluate at 1 and 2 NFE (and
50 for flow matching). Runs and results are cached in --out (default runs/ablations) by a hash of their resolved
overrides, so rerunning the same command after a crash or Ctrl-C resumes: finished runs are not trained again and
the run in progress continues from its checkpoint. Only the markdown and the figures go to docs/.

Default budget (--steps 600 at the preset's batch 64, --n 300, 1-NFE): what docs/ablations.md was made with; its
tables record each run's wall time (README, Ablations), plus about 10 minutes for the toys. Exit status:
0 done, 2 bad arguments (one line naming the argument), 1 a run that failed for another reason than divergence (the
line names its log), 75 interrupted (rerun to resume).
"""

import argparse
import os
import signal
import sys
import time

from meanflow.ablation import evaluation, figures, grid, report, runner, toys
from meanflow.config import PRESETS, ConfigError, resolve_config

PROG = "meanflow.experiments"
DEFAULT_STEPS = 600  # README, Ablations: what fits about 40 minutes on 2 CPU cores with DiT-Micro/8
DEFAULT_N = 300
DEFAULT_TOY_N = 2000
QUICK = {"steps": 2, "n": 8, "toy_steps": 2, "toy_n": 64}
INTERRUPTED = 75


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every meanflow command, instead of usage + message
        raise ConfigError(message)


def build_parser():
    p = _Parser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("ablations", "toys"), help="the MNIST grid (and the toys), or the toys alone")
    p.add_argument("--base", default="mnist-demo", help="the preset every MNIST run starts from (tests: smoke)")
    p.add_argument("--steps", type=int, default=None, help=f"train.steps of every MNIST run (default {DEFAULT_STEPS})")
    p.add_argument("--batch", type=int, default=None, help="train.global_batch of every run (default: the preset's)")
    p.add_argument("--n", type=int, default=None, help=f"samples per FID (default {DEFAULT_N})")
    p.add_argument("--nfe", default="1", help="step counts every MNIST run is evaluated at, comma-separated "
                   "(default 1; 1,2 adds the 2-NFE column, ~50 s a run at n = 300); flow matching adds 50")
    p.add_argument("--toy-steps", type=int, default=None, help="train.steps of the toy runs (default: the presets')")
    p.add_argument("--toy-n", type=int, default=None, help=f"samples per toy distance (default {DEFAULT_TOY_N})")
    p.add_argument("--out", default="runs/ablations", help="the run folders and cached results (never in docs/)")
    p.add_argument("--doc", default="docs/ablations.md", help="the markdown written; figures go beside it in "
                   "<doc without .md>/")
    p.add_argument("--quick", action="store_true", help=f"a test-sized grid: {QUICK} unless given")
    p.add_argument("--no-toys", action="store_true", help="ablations: leave the 2-D toy section out")
    p.add_argument("--dry-run", action="store_true", help="print the distinct runs and their overrides, train nothing")
    return p


def parse_args(argv):
    a = build_parser().parse_args(argv)
    for key, default in (("steps", DEFAULT_STEPS), ("n", DEFAULT_N), ("toy_n", DEFAULT_TOY_N), ("toy_steps", None)):
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else default)
    for key, low in (("steps", 1), ("batch", 1), ("n", 2), ("toy_steps", 1), ("toy_n", 2)):
        value = getattr(a, key)
        if value is not None and value < low:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= {low}, got {value}")
    text = a.nfe
    try:
        a.nfe = tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        a.nfe = ()
    if not a.nfe or min(a.nfe) < 1 or 1 not in a.nfe:
        raise ConfigError(f"--nfe: expected comma-separated step counts including 1, such as 1,2; got {text!r}")
    if a.base not in PRESETS:
        raise ConfigError(f"--base: unknown preset {a.base!r}; presets: {', '.join(PRESETS)}")
    if not a.doc.endswith(".md"):
        raise ConfigError(f"--doc: the doc is markdown and must end in .md, got {a.doc!r}")
    docs = os.path.dirname(os.path.abspath(a.doc))
    out = os.path.abspath(a.out)
    if out == docs or out.startswith(docs + os.sep):
        raise ConfigError(f"--out: {a.out} lies inside {os.path.dirname(a.doc) or '.'}, the doc's folder; run "
                          "folders stay out of docs/ (default runs/ablations)")
    return a


def check_configs(runs):
    """Resolve every run's config before the first training: a bad override fails now, not an hour in."""
    for run in runs:
        try:
            resolve_config(run.argv("unused"))
        except ConfigError as e:
            raise ConfigError(f"{run.name}: {e}") from None


def budget_of(a, runs, results):
    """What the doc states of the shared budget, read from the default run's resolved config and its result."""
    default = next(r for r in runs if r.slug == "default")
    cfg = resolve_config(default.argv("unused"))
    metrics = ((results.get(default.key) or {}).get("result") or {}).get("metrics") or {}
    return {"base": a.base, "model": f"{cfg.model.name} ({cfg.model.input_size}x{cfg.model.input_size}x"
                                      f"{cfg.model.in_channels}, {cfg.model.num_classes} classes)",
            "steps": cfg.train.steps, "batch": cfg.train.global_batch, "seed": cfg.train.seed, "n": a.n,
            "eval_steps": f"at {', '.join(map(str, a.nfe))} NFE (flow matching also at 50 steps)",
            "default": ", ".join(f"{k.split('.')[1]} = {v}" for k, v in grid.PAPER_DEFAULT.items()),
            "floor": metrics.get("real_vs_real_floor"), "classifier": metrics.get("classifier_test_accuracy")}


def draw_mnist_figures(fig_dir, rel, cells, results, rows):
    """{ablation key: {"chart": path, "samples": {label: path}}}, paths relative to the doc."""
    out = {}
    drawn = {}  # (run, nfe) -> path: a run shared by several tables is drawn once
    for ablation in grid.ABLATIONS:
        chart = f"{ablation.key}.png"
        figures.ablation_chart(os.path.join(fig_dir, chart), f"{ablation.title} (paper Table {ablation.paper_table})",
                               rows[ablation.key])
        samples = {}
        for s in ablation.settings:
            run = cells[(ablation.key, s.label)]
            entry = results.get(run.key)
            if (run.key, s.nfe) not in drawn:
                name = f"samples-{run.slug}" + ("" if s.nfe == 1 else f"-{s.nfe}nfe") + ".png"
                x = None if entry is None else figures.run_samples(entry["dir"], s.nfe)
                if x is not None:
                    figures.samples_png(os.path.join(fig_dir, name), x)
                drawn[(run.key, s.nfe)] = None if x is None else f"{rel}/{name}"
            samples[s.label] = drawn[(run.key, s.nfe)]
        out[ablation.key] = {"chart": f"{rel}/{chart}", "samples": samples}
    return out


def run_toys(a, fig_dir, rel, comments, say, train=True):
    """The toy grid and its markdown section (or a line saying why it cannot run here); train=False: only what the
    cache holds (ablations --no-toys)."""
    missing = evaluation.toy_evaluator_missing()
    triples = toys.toy_runs(grid.budget_overrides(a.toy_steps))
    info = {"steps": a.toy_steps, "n": a.toy_n}
    if missing:
        return toys.toy_section(triples, {}, info, {}, comments, missing), 0.0
    runs = [r for _, mf, fm in triples for r in (mf, fm)]
    folder = os.path.join(a.out, "toy")
    if train:
        check_configs(runs)
        results = runner.run_all(runs, folder, a.toy_n, evaluation.evaluate_toy, say)
    else:
        results = runner.cached(runs, folder, a.toy_n)
        if not results:
            return toys.toy_section(triples, {}, info, {}, comments, "left out (--no-toys)"), 0.0
    drawn = {}
    for preset, mf, fm in triples:
        if mf.key in results and fm.key in results:
            name = f"toy-{preset.removeprefix('toy-')}.png"
            toys.toy_figure(os.path.join(fig_dir, name), preset, results[mf.key]["dir"], results[fm.key]["dir"],
                            min(a.toy_n, 2000))
            drawn[preset] = f"{rel}/{name}"
    seconds = sum(e["trained"]["seconds"] + e["result"]["seconds"] for e in results.values())
    return toys.toy_section(triples, results, info, drawn, comments), seconds


def run(a, say=print) -> int:
    runs, cells = grid.mnist_runs(a.base, grid.budget_overrides(a.steps, a.batch), a.nfe)
    if a.dry_run:
        for run in runs:
            say(f"{run.name}: {', '.join(run.labels)}\n    --config {a.base} "
                + " ".join(f"--{k}={v}" for k, v in sorted(run.overrides.items())) + f"  (eval at {run.eval_steps})")
        return 0
    check_configs(runs)
    figures.pyplot()  # fail now, not after the grid, when matplotlib is missing
    if a.command == "toys" and evaluation.toy_evaluator_missing():
        raise ConfigError(f"toys: {evaluation.toy_evaluator_missing()}")
    fig_dir = os.path.splitext(a.doc)[0]
    rel = os.path.basename(fig_dir)
    os.makedirs(fig_dir, exist_ok=True)
    comments = report.read_comments(a.doc)
    mnist_dir = os.path.join(a.out, "mnist")
    if a.command == "ablations":
        results = runner.run_all(runs, mnist_dir, a.n, evaluation.evaluate_mnist, say,
                                 share_dir=os.path.join(mnist_dir, "fid-real-features"))
    else:  # the MNIST tables as far as the cache has them
        results = runner.cached(runs, mnist_dir, a.n)
    toy_lines, toy_s = run_toys(a, fig_dir, rel, comments, say, train=not a.no_toys)
    rows = {ab.key: report.rows_for(ab, cells, results) for ab in grid.ABLATIONS}
    drawn = draw_mnist_figures(fig_dir, rel, cells, results, rows)
    machines = list({tuple(sorted(e["trained"]["machine"].items())): e["trained"]["machine"]
                     for e in results.values()}.values())
    total = sum(e["trained"]["seconds"] + e["result"]["seconds"] for e in results.values()) + toy_s
    text = report.render(budget=budget_of(a, runs, results), machines=machines, total_s=total, ablation_rows=rows,
                         figures=drawn, comments=comments, toy_lines=toy_lines,
                         generated=time.strftime("%Y-%m-%d %H:%M"))
    tmp = f"{a.doc}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.doc)
    say(f"wrote {a.doc} and its figures in {fig_dir}/")
    return 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # stop as on Ctrl-C: the running trainer is told and saves its checkpoint


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        a = parse_args(argv)
        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            return run(a)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except figures.FiguresUnavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (runner.RunFailed, evaluation.EvaluationFailed) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (runner.Interrupted, KeyboardInterrupt) as e:
        print(f"{PROG}: interrupted{': ' + str(e) if str(e) else ''}; rerun the same command to resume (finished "
              "runs are cached, the interrupted one continues from its checkpoint)", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
