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
import math
import struct

import torch
import torch.autograd.forward_ad as fwAD

from mfkernels._backend import _interpreting, get_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel definitions still execute against this stand-in; use_triton() is then always False

    class _TritonMissing:
        """Stands in for triton and triton.language: decorators pass functions through, types are None."""

        constexpr = float32 = float64 = float16 = bfloat16 = None

        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda fn: fn

        @staticmethod
        def Config(*args, **kwargs):
            return None

    triton = tl = _TritonMissing()

# Fixed at import, like triton itself: the interpreter takes exactly one autotune config, computes bf16 arithmetic
# wrongly and truncates fp32 -> bf16 casts, and the kernels work around each of these only when it is on.
INTERPRET = _interpreting()
LOG2E = 1.0 / math.log(2.0)

# A whole row lives in registers. Compiled for sm_80 and sm_90 (mfkernels.aot), the adaLN kernels keep every form
# (y, y and dy, dy alone) out of spills up to 4096 channels in 16- and 32-bit dtypes; at 8192 the fp32 tangent-only
# form spills even with 16 warps (128 registers a thread). Wider rows take the torch path (or raise when the triton
# backend is forced).
MAX_BLOCK_C = 4096
# Elements per program tile (rows x padded C): enough work per program for small C, few enough registers for large C
# (rows of up to 2048 channels share a tile; a 4096-channel row is a tile of its own).
TILE_ELEMS = 2048
# Interpreter: few programs, yet more than one partial per batch, so tests exercise the second-stage reduction.
_INTERPRETER_PROGRAMS = 4


jit = triton.jit
_INTERPRETER = tl.constexpr(INTERPRET) if tl.constexpr is not None else False


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


WARPS = (1, 2, 4, 8, 16)


def warps_for_tile(block_n: int, block_c: int) -> tuple:
    """The num_warps a GPU autotune tries for a (block_n, block_c) row tile. Tiles of up to TILE_ELEMS elements get
    ~8 fp32 values per thread per live array (2048 -> 8 warps) and 16 warps; the widest rows get what the compile gate
    (mfkernels.aot, triton 3.6 and 3.8, sm_80 and sm_90) found free of register spills and stack frames in every form
    and dtype: 4 warps for a 2048-channel row (8 and 16 leave some forms an 8-16 byte stack frame), 16 for a
    4096-channel row (4 spills, 8 leaves a frame)."""
    if block_c >= 4096:
        return (16,)
    if block_c == 2048:
        return (4,)
    base = max(1, min(8, block_n * block_c // 256))
    return (base, 16) if block_n * block_c >= TILE_ELEMS else (base,)


def _prune_warps(configs, named_args, **kwargs):
    # triton 3.6-3.9 pass the constexprs as kwargs; without them, keep every config rather than guess
    meta = {**named_args, **kwargs}
    if "BLOCK_N" not in meta or "BLOCK_C" not in meta:
        return configs
    kept = [c for c in configs if c.num_warps in warps_for_tile(meta["BLOCK_N"], meta["BLOCK_C"])]
    return kept or configs[:1]


def kernel_takes(op: str, reason) -> bool:
    """Whether an op launches its kernel, given why the kernel would decline these inputs (None: it takes them):
    declined inputs take the torch path, except under the forced triton backend, which raises the reason."""
    if reason is None:
        return True
    if get_backend() == "triton":
        raise ValueError(f"{op}: {reason}; use mfkernels.set_backend('auto') or 'torch'")
    return False


def fp64_on_gpu(t) -> bool:
    """fp64 kernels are for float64 tests in the interpreter: their tiles need twice the registers and shared memory
    of fp32 ones, and the compile gate found them spilling on sm_80 and sm_90. On a GPU fp64 takes the torch path."""
    return t.is_cuda and t.dtype == torch.float64


FP64_INTERPRETER_ONLY = "fp64 kernels run in the Triton interpreter only (on a GPU their tiles spill)"


def configs_for(interpreter_config, gpu_configs):
    """The autotune list: the GPU configs, or the one config the interpreter accepts."""
    return [interpreter_config] if INTERPRET else list(gpu_configs)


def autotune_warps(key):
    """num_warps autotuned per key around the tile-size heuristic on a GPU (:func:`warps_for_tile`); one config in
    the interpreter (num_warps means nothing there)."""
    configs = configs_for(triton.Config({}, num_warps=4), [triton.Config({}, num_warps=w) for w in WARPS])
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


def is_traced(*tensors) -> bool:
    """True when autograd, a torch.func transform, forward-mode AD or a torch.compile trace would see through these
    tensors: ops then go through their autograd.Functions. Otherwise (inference, sampling, the tangent under no_grad)
    they may launch a kernel directly and skip what only a backward or a jvp needs."""
    return (records_graph(*tensors) or torch._C._functorch.maybe_current_level() is not None
            or torch.compiler.is_compiling() or any(fwAD.unpack_dual(t).tangent is not None for t in tensors))


@contextlib.contextmanager
def kernel_launch():
    """Launch with functorch disabled: the tensors touched inside must be plain (see :func:`plain`)."""
    with torch._C._DisableFuncTorch(), torch.no_grad():
        yield


# ----------------------------------------------------------------------------------------------------------------------
# dtypes and scalars
# ----------------------------------------------------------------------------------------------------------------------

def dot_types(dtype):
    """(ACC, DOT, PRECISION) constexprs for tl.dot over inputs of this dtype.

    ACC: accumulator and statistics type (fp64 only for fp64 inputs, so float64 tests reach 1e-10).
    DOT: operand type. On a GPU the input dtype itself (bf16/fp16 tensor cores); the interpreter computes bf16
    arithmetic wrongly, so there bf16 is widened to fp32 right after each load.
    PRECISION: TF32 tensor cores for fp32 operands on a GPU (the interpreter computes them exactly; callers send fp32
    inputs to the kernels only where TF32 is allowed, see :func:`mfkernels.attention._declined`): the "ieee" FMA path
    and tf32x3 need more registers than the attention kernels have and spill. Ignored for 16-bit operands; fp64 is
    interpreter-only.
    """
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, tl.float32, "tf32"
    if dtype == torch.bfloat16:
        return tl.float32, (tl.float32 if INTERPRET else tl.bfloat16), "tf32"
    return tl.float32, tl.float16, "tf32"


def out_dtype(dtype):
    """Dtype a kernel stores into for outputs of this dtype. The interpreter truncates fp32 -> bf16 casts where the
    GPU rounds to nearest even, so there bf16 results are stored in fp32 and rounded by torch (:func:`finish`)."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def finish(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def split_scalar(x):
    """x as hi + lo, two fp32 kernel scalars (triton passes Python floats as fp32); fp64 kernels add both back."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def last_dim_contiguous(t):
    """t itself when its last dimension has unit stride (the kernels take the other strides as arguments: (B, N, H, D)
    views need no copy), else a contiguous copy (expanded gradients have stride 0)."""
    return t if t.stride(-1) == 1 else t.contiguous()
