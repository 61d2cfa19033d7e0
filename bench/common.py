"""What every suite shares: the device, synchronised timing, rotating input pools, the kernel-backend switch, and
the two memory meters (CUDA peak allocated; on CPU the bytes autograd saves for backward).

Timing rules the suites follow: warm-up calls before any timed one (Triton autotuning, allocator growth), a device
synchronisation inside every timed call (GPU work is asynchronous: without it a timer measures the launch), and a
small pool of pre-drawn input sets cycled call by call, so a cache holding the previous call's inputs cannot
flatter the result.
"""

import contextlib
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass

import pytest
import torch

import mfkernels


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_gpu(device: torch.device, what: str) -> None:
    """Kernel suites are GPU speed targets; the Triton interpreter on CPU is a correctness tool, not one."""
    if device.type != "cuda":
        pytest.skip(f"{what}: GPU only (the Triton interpreter is not a speed target)")


@dataclass(frozen=True)
class Profile:
    """How much each benchmark measures. ``FULL`` is `pytest bench/ --benchmark`; ``QUICK`` (``--gpu-check``, what
    `make gpu-check` runs) takes the same measurements with fewer and shorter rounds, to fit the check's time budget.

    A kernel benchmark times about ``seconds`` of calls, within its suite's [lo, hi] rounds with lo scaled by
    ``round_scale``; the GPU training step runs its suite's (warm-up, timed) rounds scaled by ``round_scale``.
    """

    name: str
    seconds: float
    round_scale: float

    @property
    def quick(self) -> bool:
        return self.name != FULL.name

    def scaled(self, rounds: int) -> int:
        return max(1, math.ceil(rounds * self.round_scale))

    def kernel_rounds(self, estimate_s: float, lo: int, hi: int) -> int:
        """Timed rounds of a kernel benchmark whose call takes about ``estimate_s``."""
        return max(self.scaled(lo), min(hi, int(self.seconds / max(estimate_s, 1e-9))))


FULL = Profile("full", seconds=1.0, round_scale=1.0)
QUICK = Profile("gpu-check", seconds=0.2, round_scale=0.5)


class Rotation:
    """Cycle through pre-drawn input sets, one per call."""

    def __init__(self, sets):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets = list(sets)
        self.calls = 0

    def next(self):
        item = self.sets[self.calls % len(self.sets)]
        self.calls += 1
        return item


def pool_size(set_bytes: int, floor_bytes: int = 256 * 2**20, lo: int = 2, hi: int = 8) -> int:
    """Enough input sets that the pool outgrows a GPU's L2 (~50 MB on an H100) several times over."""
    return max(lo, min(hi, -(-floor_bytes // max(set_bytes, 1))))


@contextlib.contextmanager
def kernel_backend(name: str):
    """Run mfkernels ops through ``name`` ("torch" or "triton") inside the block, then restore the previous one."""
    previous = mfkernels.get_backend()
    mfkernels.set_backend(name)
    try:
        yield
    finally:
        mfkernels.set_backend(previous)


def timed(fn, device: torch.device):
    """Wrap ``fn`` so that a timed call ends when the device has finished its work."""
    def call():
        out = fn()
        synchronize(device)
        return out

    return call


class Case:
    """A suite's inputs and implementations: a pool of input sets (rotated per call) and ``impls`` by name, each
    called without autograd on one set."""

    def __init__(self, sets, impls, device):
        self.sets, self.inputs, self.impls, self.device = sets, Rotation(sets), impls, device

    def run(self, impl, inputs):
        with torch.no_grad():
            return self.impls[impl](*inputs)

    def call(self, impl):
        """A synchronised call of ``impl`` on the next input set of the pool."""
        return timed(lambda: self.run(impl, self.inputs.next()), self.device)


def time_once(fn, device: torch.device) -> float:
    """Seconds for one synchronised call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_and_share(fn, device: torch.device):
    """(seconds, share) for one synchronised call; share is the process's CPU time over wall time x torch threads
    (about 1 when the step had its cores to itself, well below when other jobs took them; None on GPU)."""
    cpu = time.process_time()
    seconds = time_once(fn, device)
    if device.type == "cuda":
        return seconds, None
    return seconds, (time.process_time() - cpu) / (seconds * torch.get_num_threads())


# ----------------------------------------------------------------------------------------------------------------------
# memory meters
# ----------------------------------------------------------------------------------------------------------------------

def cuda_peak_bytes(fn, device: torch.device) -> int:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before it (weights, optimizer state)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_activation_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, parameters excluded.

    They are all alive together when the forward ends, so this is the peak of the activation memory that training
    keeps (temporaries freed during the forward are not counted). functorch wraps func.jvp's dual tensors: the
    storage is the unwrapped tensor's; its lifted views of the weights expose no storage and are skipped.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(x):
        if isinstance(x, torch.Tensor):
            base = x
            while torch._C._functorch.is_functorch_wrapped_tensor(base):
                base = torch._C._functorch.get_unwrapped(base)
            try:
                storage = base.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # a lifted weight view: its storage cannot be read
                return x
            if ptr not in param_ptrs:
                seen[ptr] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


def memory_meter(device: torch.device):
    """(name of the measure, fn -> bytes) for this device; the report prints the name beside the numbers."""
    if device.type == "cuda":
        return "CUDA max allocated above the step's starting allocation", lambda fn, params: cuda_peak_bytes(fn, device)
    return "autograd-saved activation bytes (distinct storages, weights excluded)", saved_activation_bytes


# ----------------------------------------------------------------------------------------------------------------------
# what the report records about the run
# ----------------------------------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    """Device, versions and commit: stored in the JSON's machine_info["meanflow"] and printed above every table."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = bench_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "gpu"
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
        kind = "cpu"
    return {
        "device": name,
        "device_kind": kind,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
