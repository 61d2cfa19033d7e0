"""The native CPU kernels (csrc/, built by CMakeLists.txt into mfkernels/_native/libmfkernels_cpu.so), through ctypes.

The library is optional: ``make native`` (or ``make test`` / ``make demo``, which run it on first setup) builds it;
without it, or with ``MFKERNELS_NATIVE=0`` in the environment (read on every call), :func:`native_available` is
False and the ops take their torch path. Loading happens once, on first use; a library that is present but cannot be
loaded (another architecture, an old ABI) counts as absent, and :func:`load_error` says why.

Ops: :func:`adaln_forward_cpu`, the adaLN dual forward (math in :mod:`mfkernels.adaln` and csrc/adaln_cpu.c) on
contiguous CPU fp32/fp64 tensors; :func:`gelu_tanh_forward_cpu` and :func:`gelu_tanh_backward_cpu`, the tanh GELU
(csrc/gelu_cpu.c) on contiguous CPU fp32 or bf16 tensors. Each validates what it is given and raises ValueError
naming the argument: the C side trusts its pointers and shapes.

The library uses OpenMP threads over rows when it was built with OpenMP; each call passes torch's intra-op thread
count, so ``torch.set_num_threads`` governs it as it does torch's own kernels. Torch has loaded its libgomp before
this library, which binds to the same runtime (same SONAME): one thread pool in the process.
"""

import ctypes
import os
import warnings
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD

LIBRARY_PATH = Path(__file__).resolve().parent / "_native" / "libmfkernels_cpu.so"
_ABI_VERSION = 3  # csrc/adaln_cpu.c: mfk_abi_version()

_lib = None
_load_error = None  # str once a load was tried and failed
_loaded = False


def _load():
    global _lib, _load_error, _loaded
    _loaded, _lib, _load_error = True, None, None
    if not LIBRARY_PATH.exists():
        _load_error = f"{LIBRARY_PATH} does not exist"
        return
    try:
        lib = ctypes.CDLL(str(LIBRARY_PATH))
        abi = lib.mfk_abi_version()
    except (OSError, AttributeError) as e:
        _load_error = f"cannot load {LIBRARY_PATH}: {e}"
    else:
        if abi != _ABI_VERSION:
            _load_error = f"{LIBRARY_PATH} has ABI version {abi}, expected {_ABI_VERSION}"
    if _load_error is not None:
        # a library that is there but unusable is a broken build, not an opt-out: say so once, then run torch
        warnings.warn(f"mfkernels: native CPU kernels disabled: {_load_error} (rebuild with `make native`)",
                      RuntimeWarning, stacklevel=3)
        return
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("mfk_adaln_dual_fwd_f32", "mfk_adaln_dual_fwd_f64"):
        fn = getattr(lib, name)
        # x, shift, scale, dx, dshift, dscale, y, dy, mean, rstd, B, N, C, eps, num_threads
        fn.argtypes = [p] * 10 + [i64, i64, i64, ctypes.c_double, ctypes.c_int]
        fn.restype = None
    for suffix in ("f32", "bf16"):
        fwd, bwd = getattr(lib, f"mfk_gelu_tanh_fwd_{suffix}"), getattr(lib, f"mfk_gelu_tanh_bwd_{suffix}")
        fwd.argtypes = [p, p, i64, ctypes.c_int]  # x, y, n, num_threads
        bwd.argtypes = [p, p, p, i64, ctypes.c_int]  # g, x, dx, n, num_threads
        fwd.restype = bwd.restype = None
    lib.mfk_has_openmp.restype = ctypes.c_int
    _lib = lib


def _library():
    if not _loaded:
        _load()
    return _lib


def native_available() -> bool:
    """True when the native library is loaded and not disabled by ``MFKERNELS_NATIVE=0``."""
    if os.environ.get("MFKERNELS_NATIVE", "1") == "0":
        return False
    return _library() is not None


def can_run_on(*tensors) -> bool:
    """True when a native kernel may take these tensors and nothing would trace through the C call: they are plain
    CPU tensors (no subclass, no forward-mode tangent), no torch.func transform or torch.compile trace is active, and
    the library is loaded and enabled. Each op adds its own dtype rule."""
    return (
        all(t.device.type == "cpu" for t in tensors)
        and not torch.compiler.is_compiling()  # first: a file-system probe inside a trace is a graph break
        and torch._C._functorch.maybe_current_level() is None
        and native_available()
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) and fwAD.unpack_dual(t).tangent is None
                for t in tensors)
    )


def load_error():
    """Why the library is not available (None when it is, or when it was disabled by the environment)."""
    if os.environ.get("MFKERNELS_NATIVE", "1") == "0":
        return None
    _library()
    return _load_error


def has_openmp() -> bool:
    lib = _library()
    return lib is not None and bool(lib.mfk_has_openmp())


def _validate(x, named):
    """x (B, N, C) or (B, C); named: the other inputs, {name: tensor}. Raises ValueError naming the culprit."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"adaln_forward_cpu: x must be a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"adaln_forward_cpu: x must be (B, N, C) or (B, C), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"adaln_forward_cpu: x must be float32 or float64, got {x.dtype}")
    B, C = x.shape[0], x.shape[-1]
    for name, t in {"x": x, **named}.items():
        want = tuple(x.shape) if name in ("x", "dx") else (B, C)
        _check_tensor("adaln_forward_cpu", name, t, want, x.dtype)


def _check_tensor(op, name, t, shape, dtype):
    """t: a plain contiguous CPU tensor of this shape and dtype, else a ValueError naming op and argument."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{op}: {name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous())")
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise ValueError(f"{op}: {name} must be a plain tensor, got a {type(t).__name__} (a tensor subclass or a "
                         "torch.func wrapper has no memory to hand to C)")


def adaln_forward_cpu(x, shift, scale, dx, dshift, dscale, eps):
    """(y, dy, mean, rstd) of the adaLN dual op by the native kernel; x, dx (B, N, C) or (B, C); shift, scale, dshift,
    dscale (B, C); all contiguous CPU tensors of one dtype, float32 or float64. mean and rstd: x.shape[:-1], x's
    dtype. Fresh outputs, no autograd (the caller attaches y to a graph); inputs are never written."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"mfkernels native library unavailable ({_load_error}): build it with `make native`")
    _validate(x, {"shift": shift, "scale": scale, "dx": dx, "dshift": dshift, "dscale": dscale})
    B, C = x.shape[0], x.shape[-1]
    N = x.shape[1] if x.dim() == 3 else 1
    y, dy = torch.empty_like(x), torch.empty_like(x)  # (B, N, C)
    mean = torch.empty(x.shape[:-1], dtype=x.dtype)  # (B, N)
    rstd = torch.empty(x.shape[:-1], dtype=x.dtype)  # (B, N)
    fn = lib.mfk_adaln_dual_fwd_f32 if x.dtype == torch.float32 else lib.mfk_adaln_dual_fwd_f64
    fn(*(t.data_ptr() for t in (x, shift, scale, dx, dshift, dscale, y, dy, mean, rstd)), B, N, C, float(eps),
       torch.get_num_threads())
    return y, dy, mean, rstd


def _gelu_library(op):
    lib = _library()
    if lib is None:
        raise RuntimeError(f"{op}: mfkernels native library unavailable ({_load_error}): build it with `make native`")
    return lib


GELU_DTYPES = (torch.float32, torch.bfloat16)
_GELU_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _gelu_dtype(op, x):
    if not isinstance(x, torch.Tensor) or x.dtype not in GELU_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be torch.float32 or torch.bfloat16, got {got}")
    return x.dtype


def gelu_tanh_forward_cpu(x):
    """gelu_tanh(x) by the native kernel: x a contiguous CPU fp32 or bf16 tensor of any shape; a fresh output of its
    dtype, no autograd."""
    lib = _gelu_library("gelu_tanh_forward_cpu")
    dtype = _gelu_dtype("gelu_tanh_forward_cpu", x)
    _check_tensor("gelu_tanh_forward_cpu", "x", x, x.shape, dtype)
    y = torch.empty_like(x)
    getattr(lib, f"mfk_gelu_tanh_fwd_{_GELU_SUFFIX[dtype]}")(x.data_ptr(), y.data_ptr(), x.numel(),
                                                             torch.get_num_threads())
    return y


def gelu_tanh_backward_cpu(g, x):
    """g * gelu_tanh'(x) by the native kernel (contiguous CPU, one shape, both fp32 or both bf16); a fresh output,
    no autograd."""
    lib = _gelu_library("gelu_tanh_backward_cpu")
    dtype = _gelu_dtype("gelu_tanh_backward_cpu", x)
    _check_tensor("gelu_tanh_backward_cpu", "x", x, x.shape, dtype)
    _check_tensor("gelu_tanh_backward_cpu", "g", g, x.shape, dtype)
    dx = torch.empty_like(x)
    getattr(lib, f"mfk_gelu_tanh_bwd_{_GELU_SUFFIX[dtype]}")(g.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(),
                                                             torch.get_num_threads())
    return dx
