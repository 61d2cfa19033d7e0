"""Plumbing shared by the Triton ops (adaLN, gated residual, attention): a triton import that may fail, tile and grid
heuristics, a small num_warps autotune, and launching from inside autograd.Functions under torch.func transforms.

Why the functorch part exists: under ``torch.func.jvp`` / ``grad`` a Function's ``jvp`` and ``backward`` receive
functorch wrapper tensors, whose storage Triton cannot read ("Cannot access storage of TensorWrapper"). The kernels are
therefore launched on the unwrapped base tensors with functorch disabled, and return plain tensors, which functorch
accepts as the result of ``jvp``/``backward``. A kernel's result has no autograd history, so when that history is
needed (a graph is being recorded through a tangent or a gradient: double backward, grad of a jvp) the ops compute in
differentiable torch instead; :func:`records_graph` makes that call.
"""

import contextlib
import functools
from types import SimpleNamespace

import torch

from mfkernels._backend import _interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels become inert stubs; use_triton() is then always False, so the torch path runs
    triton = None
    tl = SimpleNamespace(constexpr=None, float32=None, float64=None, bfloat16=None)

# A whole row lives in registers. Compiled for sm_90 (ptxas -v, triton 3.8, fp32 accumulation), the adaLN kernels
# stay spill-free up to 8192 channels with 16 warps (<= 123 registers) and spill at 16384. Wider rows take the torch
# path (or raise when the triton backend is forced).
MAX_BLOCK_C = 8192
# Elements per program tile (rows x padded C): enough work per program for small C, few enough registers for large C.
TILE_ELEMS = 4096
# Interpreter: few programs, yet more than one partial per batch, so tests exercise the second-stage reduction.
_INTERPRETER_PROGRAMS = 4


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


_INTERPRETER = tl.constexpr(_interpreting()) if triton is not None else False


@jit
def cast_out(v, DTYPE: tl.constexpr):
    """v (fp32 or fp64) in the output dtype, rounded to nearest even on every backend."""
    if _INTERPRETER and DTYPE == tl.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates (a GPU's rounds to nearest even): round by hand, the usual
        # bias-and-shift on the bits (finite values; NaN and inf come out as NaN / inf)
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(DTYPE)
    return out


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_tile(n_rows: int, block_c: int) -> int:
    """Rows per program tile for a padded row width block_c."""
    return max(1, min(TILE_ELEMS // block_c, next_power_of_2(n_rows)))


def _warps_for(tile_elems: int) -> int:
    # ~16 fp32 values per thread per live array, as in Triton's LayerNorm tutorial (4096 elements -> 8 warps)
    return max(1, min(16, tile_elems // 512))


def _prune_warps(configs, named_args, **kwargs):
    # triton 3.6-3.9 pass the constexprs as kwargs; without them, keep every config rather than guess
    meta = {**named_args, **kwargs}
    if "BLOCK_N" not in meta or "BLOCK_C" not in meta:
        return configs
    want = _warps_for(meta["BLOCK_N"] * meta["BLOCK_C"])
    kept = [c for c in configs if want // 2 <= c.num_warps <= want * 2]
    return kept or configs[:1]


def autotune_warps(key):
    """num_warps autotuned per key around the tile-size heuristic on a GPU; one config in the interpreter (the only
    thing it accepts, and num_warps means nothing there)."""
    if triton is None:
        return lambda fn: fn
    if _interpreting():
        return triton.autotune(configs=[triton.Config({}, num_warps=4)], key=key)
    configs = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_warps})


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_groups(n_blocks: int, batch: int, device: torch.device) -> int:
    """Programs per batch element for a reduction over rows: enough to fill the GPU, each writing one partial."""
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = _INTERPRETER_PROGRAMS
    return max(1, min(n_blocks, -(-target // batch)))


def acc_dtype(dtype: torch.dtype):
    """(torch, triton) accumulation dtypes: fp64 for fp64 inputs (so float64 tests reach 1e-10), fp32 otherwise."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _levels(t):
    while t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
        yield t
        t = torch._C._functorch.get_unwrapped(t)
    if t is not None:
        yield t


def plain(t):
    """The base tensor under any functorch wrappers (None stays None)."""
    for t in _levels(t):
        pass
    return t


def records_graph(*tensors) -> bool:
    """True when autograd would record through these tensors at some level, so a kernel's history-less result would
    silently cut a gradient."""
    return torch.is_grad_enabled() and any(level.requires_grad for t in tensors for level in _levels(t))


@contextlib.contextmanager
def kernel_launch():
    """Launch with functorch disabled: the tensors touched inside must be plain (see :func:`plain`)."""
    with torch._C._DisableFuncTorch(), torch.no_grad():
        yield
