"""Test-wide setup: the Triton interpreter is on (set before triton is imported), and ops default to the torch
reference so that model tests stay fast; kernel tests ask for the `triton_backend` fixture."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mfkernels  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_backend_by_default():
    mfkernels.set_backend("torch")
    yield
    mfkernels.set_backend("torch")


@pytest.fixture
def triton_backend():
    """Run mfkernels ops through the Triton kernels (the interpreter on CPU)."""
    mfkernels.set_backend("triton")
    yield
    mfkernels.set_backend("torch")


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    torch.manual_seed(s)
    return s
