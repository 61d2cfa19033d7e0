"""Test-wide setup. Without CUDA the Triton interpreter is on (set before triton is imported) and kernel tests run
the kernels on CPU tensors through it; with CUDA (the CUDA tier, ``make gpu-check``) nothing forces the interpreter,
and the same kernel tests run the compiled kernels with their real autotune configs on CUDA tensors. Ops default to
the torch reference so that model tests stay fast; kernel tests ask for the `triton_backend` fixture."""

import os

import torch

ON_CUDA = torch.cuda.is_available()  # torch imports no triton: the interpreter switch below still takes effect
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mfkernels  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def _interpreter_only(item):
    """Marked so, or an attention kernel test in float64 (fp64 attention kernels need the interpreter)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    float64_attention = ("triton_backend" in getattr(item, "fixturenames", ()) and "attention" in item.nodeid
                         and params.get("dtype") is torch.float64)
    return item.get_closest_marker("interpreter_only") is not None or float64_attention


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.skip(reason="slow: run with --runslow")
    interpreter = pytest.mark.skip(reason="runs the kernels in float64 or on CPU tensors: the interpreter's tier")
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(slow)
        if item.get_closest_marker("cuda") is not None and not ON_CUDA:
            item.add_marker(no_cuda)
        if ON_CUDA and _interpreter_only(item):
            item.add_marker(interpreter)


@pytest.fixture(autouse=True)
def _torch_backend_by_default():
    mfkernels.set_backend("torch")
    yield
    mfkernels.set_backend("torch")


@pytest.fixture
def triton_backend():
    """Run mfkernels ops through the Triton kernels: the interpreter on CPU tensors, or, where CUDA is present, the
    compiled kernels on CUDA tensors (new tensors default to the GPU, and TF32 is allowed, as the kernels' fp32 dots
    use it)."""
    mfkernels.set_backend("triton")
    if not ON_CUDA:
        yield
    else:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.device("cuda"):
            yield
        torch.backends.cuda.matmul.allow_tf32 = tf32
    mfkernels.set_backend("torch")


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so that a failure can be replayed (MEANFLOW_TEST_SEED=<seed> pytest ...)."""
    given = os.environ.get("MEANFLOW_TEST_SEED")
    if given is not None and not given.isdigit():
        raise pytest.UsageError(f"MEANFLOW_TEST_SEED must be a non-negative integer (a printed seed), got {given!r}")
    s = int(given) if given is not None else int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    torch.manual_seed(s)
    return s


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (fully_shard needs one), torn down after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
