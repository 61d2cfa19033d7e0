"""Which implementation an op runs: the Triton kernels or the torch reference.

The choice is made per call from the tensors' device and one switch:

- ``MFKERNELS_BACKEND`` (environment) or :func:`set_backend` (code): ``"auto"`` (default), ``"triton"`` or
  ``"torch"``.
- ``"auto"`` runs Triton on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` was set before triton
  was imported (the interpreter is how CI exercises the kernels); everything else takes the torch reference.
- ``"triton"`` insists on the kernels and raises if they cannot run on the given tensors.
"""

import functools
import os

import torch

_VALID = ("auto", "triton", "torch")
_backend = None  # None: read the environment on first use, so tests can set it late


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """Whether triton imports, probed once per process: Python does not remember a failed import, so without triton
    every probe would search sys.path again (45 us on every op call, ~3 ms of a demo training step)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"triton"`` or ``"torch"`` for every op of mfkernels."""
    global _backend
    if name not in _VALID:
        raise ValueError(f"mfkernels backend must be one of {_VALID}, got {name!r}")
    _backend = name


def get_backend() -> str:
    if _backend is not None:
        return _backend
    name = os.environ.get("MFKERNELS_BACKEND", "auto")
    if name not in _VALID:
        raise ValueError(f"MFKERNELS_BACKEND must be one of {_VALID}, got {name!r}")
    return name


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel on these tensors."""
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = (on_cuda or (_interpreting() and not any(t.is_cuda for t in tensors))) and triton_available()
    if backend == "triton" and not runnable:
        raise RuntimeError(
            "MFKERNELS_BACKEND=triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton "
            "is imported"
        )
    return runnable


def backend_summary(device: torch.device) -> dict:
    """Which implementation each op runs for tensors on `device` under the current switch, for a run's summary:
    "triton" (compiled kernels), "interpreter" (the same kernels on CPU), "native" (the C kernels of the CPU adaLN dual
    op and of fp32/bf16 GELU), or "torch". Per-call exceptions (fp64 on a GPU, head dims or rows the kernels decline)
    are not listed."""
    from mfkernels import _native  # the C library is probed only when a summary asks

    native = device.type == "cpu" and _native.native_available()
    gelu = "native (fp32, bf16)" if native else "torch"
    backend = get_backend()
    if backend != "torch" and triton_available() and (device.type == "cuda" or _interpreting()):
        kernels = "triton" if device.type == "cuda" else "interpreter"
        return {"attention": kernels, "adaln_modulate": kernels, "gated_residual": kernels, "gelu_tanh": gelu}
    adaln = "native (dual op), torch" if native else "torch"
    return {"attention": "torch", "adaln_modulate": adaln, "gated_residual": "torch", "gelu_tanh": gelu}
