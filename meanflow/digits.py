"""Class accuracy of MNIST samples: a small CNN trained once on the embedded digits, cached beside the mnist cache.

A conditional model asked for digit y should draw a y. Its class accuracy at a step count is the fraction of samples a
classifier reads as the digit they were drawn for,

    accuracy = (1/n) sum_i [argmax_c f(x_i)_c == y_i],    accuracy_c = the same mean over the samples with y_i = c,

where f is a LeNet-style CNN (two 5x5 convolutions with max pooling, then two linear layers) trained on real digits.
Its own accuracy on held-out real digits is the ceiling: samples that read as well as real digits score about that.
Labels balanced over the 10 classes make any classifier that ignores the image (noise in, one class out) score 10%.

Data: the 5000 digits of meanflow.data.mnist.load_mnist_digits, (1, 32, 32) in [-1, 1] (28x28 padded with -1), the
same tensors the trainer sees and the range meanflow's samples come in (after dividing by data.scale). The csv is
sorted by label, so the digits are shuffled with a fixed seed before the split: per class the first 100 of the
shuffled order are held out (1000 test digits, balanced), the other 4000 train. Training: Adam, 5 epochs of batch 50,
seeded (torch.manual_seed inside torch.random.fork_rng, so the caller's random state is untouched), on the CPU on one
thread, no workers: ~12 s and 96.5% held out, measured on a 2-core machine at load 9. One thread, not
torch.get_num_threads(): batches of 50 small images gain little from a second one, and on a busy machine OpenMP's
threads waiting for each other made it 15x slower (181 s with 2 threads, same load); one thread also gives the same
weights whatever the caller's thread count (2 threads gave other weights, 96.7%).

Cache: <base>/digit_classifier.pt, <base> the folder holding the mnist cache (data.root, else $MEANFLOW_CACHE, else
~/.cache/meanflow), a torch.save'd dict of the weights, the recipe below (its "version" included), and the held-out
accuracy overall and per class. It is written to a temporary file and renamed into place (os.replace), so it is
either absent or complete. A file that does not load, or holds another recipe or other weights, is retrained and
replaced (one line says why); a folder that cannot be written leaves the classifier uncached, with a warning.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from meanflow.data.mnist import NUM_CLASSES, load_mnist_digits, mnist_cache_dir

CACHE_FILE = "digit_classifier.pt"
# Everything that decides the weights; a file holding another recipe is someone else's and gets retrained.
# Bump "version" when the code changes what a recipe trains.
RECIPE = {"version": 1, "arch": "lenet 1-16-32 conv5, 800-128-10", "seed": 0, "test_per_class": 100, "epochs": 5,
          "batch": 50, "lr": 1e-3}
IMAGE_SHAPE = (1, 32, 32)


class DigitClassifier(nn.Module):
    """(B, 1, 32, 32) images in [-1, 1] -> (B, 10) logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 5, 5)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # (B, 10)


@dataclass
class TrainedClassifier:
    model: DigitClassifier  # in eval mode, on the CPU
    test_accuracy: float  # on the 1000 held-out real digits
    test_per_class: list  # 10 floats, the same per digit
    path: str  # the cache file (it may not exist when the folder could not be written)
    trained: bool  # trained in this call, rather than read from the cache


def classifier_path(root: str = "") -> str:
    """Where the classifier is cached: beside the mnist cache (data.root, else $MEANFLOW_CACHE, else ~/.cache)."""
    return os.path.join(os.path.dirname(mnist_cache_dir(root)), CACHE_FILE)


def split_digits(seed: int = RECIPE["seed"], test_per_class: int = RECIPE["test_per_class"]):
    """(x_train, y_train, x_test, y_test) torch tensors: per class, the first test_per_class digits of a seeded
    shuffle are held out (balanced), the rest train. x (N, 1, 32, 32) float32 in [-1, 1], y int64 (N,)."""
    x, y = load_mnist_digits()
    perm = np.random.default_rng(seed).permutation(len(y))
    test = np.concatenate([perm[y[perm] == c][:test_per_class] for c in range(NUM_CLASSES)])
    held = np.zeros(len(y), bool)
    held[test] = True
    train = perm[~held[perm]]  # still in shuffled order
    return (torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]),
            torch.from_numpy(y[test]))


# ----------------------------------------------------------------------------------------------------------------------
# predictions and accuracy
# ----------------------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def predict(classifier: nn.Module, images, batch: int = 500) -> torch.Tensor:
    """(N,) int64 predicted digits (CPU) of (N, 1, 32, 32) images in [-1, 1], in batches on the classifier's device."""
    images = torch.as_tensor(images)
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"digit images must be (N, 1, 32, 32) in [-1, 1], got shape {tuple(images.shape)}")
    device = next(classifier.parameters()).device
    out = [classifier(images[i:i + batch].to(device, torch.float32)).argmax(dim=1).cpu()
           for i in range(0, images.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def accuracy_from_predictions(predictions, labels) -> tuple:
    """(overall, per_class): the fraction of predictions equal to their label, and the same per label 0..9 (None for
    a digit no label asks for, as with n < 10)."""
    pred, labels = torch.as_tensor(predictions).long().flatten(), torch.as_tensor(labels).long().flatten()
    if pred.shape != labels.shape or pred.numel() == 0:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} must be equal, non-empty")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be digits 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    right = (pred == labels).double()
    per_class = [float(right[labels == c].mean()) if (labels == c).any() else None for c in range(NUM_CLASSES)]
    return float(right.mean()), per_class


def class_accuracy(classifier: nn.Module, images, labels) -> tuple:
    """(overall, per_class list of 10) accuracy of the classifier on (N, 1, 32, 32) images in [-1, 1] drawn for
    `labels` (N,); see accuracy_from_predictions."""
    return accuracy_from_predictions(predict(classifier, images), labels)


# ----------------------------------------------------------------------------------------------------------------------
# training and the cache
# ----------------------------------------------------------------------------------------------------------------------

def train_classifier(recipe: dict = RECIPE) -> tuple:
    """(model in eval mode, held-out accuracy, per class) trained by the recipe, on one thread (see the module
    docstring), so the weights are the same whatever the caller's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def _train(recipe):
    x, y, x_test, y_test = split_digits(recipe["seed"], recipe["test_per_class"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = DigitClassifier()
        g = torch.Generator().manual_seed(recipe["seed"])
        opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
        for _ in range(recipe["epochs"]):
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(order), recipe["batch"]):
                b = order[i:i + recipe["batch"]]
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    model.eval()
    acc, per_class = class_accuracy(model, x_test, y_test)
    return model, acc, per_class


def _read_cache(path: str):
    """(TrainedClassifier, None) from a valid cache file, else (None, why not)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None, "absent"
    except Exception as e:  # a damaged file fails anywhere in unzip or unpickle, with many exception types
        return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(blob, dict) or blob.get("recipe") != RECIPE:
        return None, "another recipe or version"
    try:
        model = DigitClassifier()
        model.load_state_dict(blob["state_dict"])
        acc, per_class = float(blob["test_accuracy"]), [float(a) for a in blob["test_per_class"]]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        return None, f"foreign content ({type(e).__name__})"
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    if not finite or not 0 <= acc <= 1 or len(per_class) != NUM_CLASSES:
        return None, "foreign content (weights or accuracies out of range)"
    return TrainedClassifier(model.eval(), acc, per_class, path, False), None


def _write_cache(path: str, model, acc, per_class) -> None:
    blob = {"recipe": RECIPE, "state_dict": model.state_dict(), "test_accuracy": acc, "test_per_class": per_class}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # unique: concurrent writers never share one
    try:
        with open(tmp, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _warn(msg):
    print(f"meanflow.digits: {msg}", file=sys.stderr, flush=True)


def load_classifier(root: str = "", log=_warn) -> TrainedClassifier:
    """The cached classifier for data.root `root`, trained (and cached) first when the cache is absent, damaged or
    foreign; `log` gets one line when it trains and says why."""
    path = classifier_path(root)
    found, why = _read_cache(path)
    if found is not None:
        return found
    t0 = time.time()
    model, acc, per_class = train_classifier()
    log(f"trained the digit classifier in {time.time() - t0:.1f} s (cache {why}): held-out accuracy {acc:.4f}")
    try:
        _write_cache(path, model, acc, per_class)
    except OSError as e:
        log(f"warning: cannot cache the digit classifier at {path} ({e}); it will be trained again next time")
    return TrainedClassifier(model, acc, per_class, path, True)


def classifier_from_state(state_dict) -> DigitClassifier:
    """A classifier in eval mode from weights sent by another rank."""
    model = DigitClassifier()
    model.load_state_dict(state_dict)
    return model.eval()
